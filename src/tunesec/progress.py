"""Rich progress bars with ETA, shared by long-running work (generation, judging, training)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class _InfoColumn(ProgressColumn):
    """Free text a task reports as it goes (``info=...``), e.g. tokens generated or the current loss."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def make_progress(enabled: bool = True) -> Progress:
    """A progress bar: description, bar, done/total, percent, an ``info`` field, elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _InfoColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not sys.stderr,
        transient=False,
    )
