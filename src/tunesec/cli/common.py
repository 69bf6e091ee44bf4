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
    if singular == "dataset":
        _list_datasets(entries)
        return
    if singular == "defense":
        _list_defenses(entries)
        return
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


def _list_defenses(entries: list) -> None:
    """Defenses grouped by lifecycle stage (the command that runs each stage is named in the section title)."""
    from tunesec.defenses.base import STAGES

    commands = {"alignment": "tunesec defend", "fine-tuning": "tunesec finetune", "post-fine-tuning": "tunesec repair"}
    for stage in [*STAGES, *sorted({str(e.metadata.get("stage")) for e in entries} - set(STAGES))]:
        group = [e for e in entries if e.metadata.get("stage") == stage]
        if not group:
            continue
        run_by = f" (run with {commands[stage]})" if stage in commands else ""
        table = Table(title=f"{stage}-stage defenses{run_by}")
        for col in ("name", "description", "paper", "needs harmful data"):
            table.add_column(col, overflow="fold", style="bold cyan" if col == "name" else None)
        for e in group:
            needs = e.metadata.get("needs_harmful")
            table.add_row(
                e.name, e.description, str(e.metadata.get("paper", "")), "" if needs is None else str(needs).lower()
            )
        console.print(table)


def _list_datasets(entries: list) -> None:
    """Datasets with their use, subsets (``NAME:SUBSET``) and whether they load here without a network."""
    import os

    from tunesec.data.named import load_dataset_by_name
    from tunesec.errors import UsageError

    table = Table(title="datasets (offline: loads here without the hub, from the data directory or the package)")
    for col in ("name", "use", "offline", "examples", "subsets", "description"):
        table.add_column(col, overflow="fold")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        for e in entries:
            try:
                n, offline = str(len(load_dataset_by_name(e.name))), "yes"
            except UsageError:
                n, offline = "", "no"
            meta = e.metadata
            table.add_row(e.name, str(meta.get("use", "")), offline, n, str(meta.get("subsets", "")), e.description)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    console.print(table)
