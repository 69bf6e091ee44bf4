"""Helpers shared by CLI modules: consoles, option types, tables."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def list_components(
    kind: str = typer.Argument(..., help="Component kind: models, datasets, judges, tasks, attacks or defenses."),
) -> None:
    """List registered components of one kind with their one-line descriptions."""
    from tunesec.errors import UsageError
    from tunesec.registry import KINDS, registry

    singular = kind[:-1] if kind.endswith("s") and kind[:-1] in KINDS else kind
    offered = [k for k in KINDS if registry.entries(k)]
    if singular not in offered:
        raise UsageError(f"unknown kind {kind!r}; expected one of {', '.join(k + 's' for k in offered)}")
    entries = registry.entries(singular)
    table = Table(title=f"{singular}s", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    meta_keys = sorted({k for e in entries for k in e.metadata if isinstance(e.metadata[k], str | int | float)})
    for key in meta_keys:
        table.add_column(key)
    for e in entries:
        table.add_row(e.name, e.description, *[str(e.metadata.get(k, "")) for k in meta_keys])
    console.print(table)
    if not entries:
        err_console.print(f"no {singular}s registered")
