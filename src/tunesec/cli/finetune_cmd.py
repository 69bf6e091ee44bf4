"""``tunesec finetune``: the provider's fine-tuning service on a user's data (:mod:`tunesec.service`).

Filter, fine-tuning-stage defenses, repairs, optional certification; one run directory with every stage's
provenance. Prints one line per stage and, last, the final model's spec (what ``--model`` takes later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def finetune_command(
    model: Annotated[str, typer.Option("--model", "-m", help="The provider's model: alias, directory, hub id.")],
    data: Annotated[str, typer.Option("--data", help="The user's chat data (file or dataset name).")],
    defense: Annotated[
        list[str] | None,
        typer.Option("--defense", help="Fine-tuning-stage defenses NAME[,NAME] (tunesec list defenses)."),
    ] = None,
    repair: Annotated[
        list[str] | None, typer.Option("--repair", help="Post-fine-tuning repairs NAME[,NAME], applied in order.")
    ] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="YAML service recipe (tunesec.service).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Recipe override KEY=VALUE, e.g. training.max_steps=20 (repeatable)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an unfinished finetune run directory.")] = None,
    certify: Annotated[
        bool | None, typer.Option("--certify/--no-certify", help="Certify the result against --model.")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="Certification policy YAML (with --certify).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Fine-tune MODEL on the user's DATA through the provider's pipeline; prints the final model's spec."""
    from tunesec.cli.attack import _data_dir
    from tunesec.cli.common import console
    from tunesec.errors import UsageError
    from tunesec.service import finetune

    if policy is not None and certify is False:
        raise UsageError("--policy is used by --certify; drop --no-certify or --policy")
    with _data_dir(data_dir):
        result = finetune(
            model,
            data,
            defenses=defense,
            repairs=repair,
            recipe=recipe,
            overrides=set_,
            out=out,
            resume=resume,
            certify=True if policy is not None and certify is None else certify,
            policy=policy,
            log=lambda line: console.print(line, markup=False, highlight=False),
        )
    for note in result.notes:
        console.print(note, markup=False, highlight=False)
    console.print(f"run directory: {result.run_dir}", markup=False, highlight=False)
    spec = result.model.adapter if result.model.adapter is not None else result.model.base
    typer.echo(spec)


def register(parent: typer.Typer) -> None:
    """Add ``finetune`` to the top-level ``tunesec`` app."""
    parent.command("finetune")(finetune_command)
