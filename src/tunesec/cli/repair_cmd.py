"""``tunesec repair``: run a post-fine-tuning repair on a tuned model into a run directory.

The repaired model (full weights, safetensors) goes to ``<run>/model``; ``run.json`` holds the repair, the models
and the full config; ``model_ref.json`` the provenance and the repair's report. The model directory is printed
last, to pass to ``tunesec evaluate --model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def repair_command(
    name: Annotated[str, typer.Argument(help="Repair name (tunesec list defenses; post-fine-tuning stage).")],
    tuned: Annotated[
        str, typer.Option("--tuned", help="Fine-tuned model: alias, model/adapter directory or run directory.")
    ],
    aligned: Annotated[str, typer.Option("--aligned", help="The aligned model it was fine-tuned from.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="Unaligned base (safelora; merge-back scope=flagged); default: under the aligned adapter."
        ),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "--config", help="YAML file with the repair's config.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override KEY=VALUE, e.g. fraction=0.05 (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Repair TUNED with post-fine-tuning defense NAME against ALIGNED; prints the repaired model's directory."""
    from tunesec.cli.attack import _data_dir
    from tunesec.cli.common import console
    from tunesec.config import apply_overrides, read_yaml
    from tunesec.defenses.base import defense_config
    from tunesec.defenses.post import repair, repair_entry

    with _data_dir(data_dir):
        entry = repair_entry(name)
        data = apply_overrides(read_yaml(recipe) if recipe is not None else {}, set_)
        source = str(recipe) if recipe is not None else "--set"
        cfg = defense_config(entry.obj, data, source=source, path=None if set_ else recipe)
        notes: list[str] = []
        run = repair(name, tuned=tuned, aligned=aligned, base=base, overrides=cfg, out=out, notes=notes)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    console.print(f"run directory: {run}")
    typer.echo(str((run / "model").resolve()))


def register(parent: typer.Typer) -> None:
    """Add ``repair`` to the top-level ``tunesec`` app."""
    parent.command("repair")(repair_command)
