"""``tunesec defend``: run an alignment-stage defense on a base model into a run directory.

The defended model (a LoRA adapter, safetensors) goes to ``<run>/model``; ``run.json`` holds the defense, its
full config and the model; the training mix (``alignment_data.jsonl``) and the harmful rows used (provenance in
``model_ref.json``) stay in the run directory. ``--eval`` measures refusal (AdvBench) and over-refusal (XSTest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tunesec.cli.attack import DEFAULT_EVAL_TOKENS


def defend_command(
    name: Annotated[str, typer.Argument(help="Defense name (tunesec list defenses; alignment stage).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Base model to defend: alias, directory, hub id.")],
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "--config", help="YAML file with the defense's config.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override KEY=VALUE, e.g. rho=3 or alignment.training.seed=43 (repeatable)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an unfinished defend run directory.")] = None,
    eval_: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate refusal (AdvBench) and over-refusal (XSTest).")
    ] = False,
    eval_limit: Annotated[int, typer.Option(min=1, help="Prompts per evaluation for --eval.")] = 100,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer for --eval.")] = DEFAULT_EVAL_TOKENS,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train on N processes of this machine (DDP: one per GPU, or CPU cores with gloo); the same as "
            "`accelerate launch --num_processes N -m tunesec ...`.",
        ),
    ] = 1,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Run alignment-stage defense NAME on MODEL; writes a run directory and prints the defended model's spec."""
    from tunesec.cli.attack import (
        _data_dir,
        _discard_on_bad_input,
        _open_run,
        _processes,
        evaluate_tuned,
        model_spec_string,
    )
    from tunesec.cli.common import console
    from tunesec.config import apply_overrides, read_yaml
    from tunesec.defenses.base import defense_config, defense_entry, run_alignment_defense

    with _data_dir(data_dir):
        entry = defense_entry(name, stage="alignment")
        data = apply_overrides(read_yaml(recipe) if recipe is not None else {}, set_)
        # line numbers point into the recipe only when no --set override could be the culprit
        source = str(recipe) if recipe is not None else "--set"
        cfg = defense_config(entry.obj, data, source=source, path=None if set_ else recipe)
        defense = entry.obj(cfg)
        _processes(processes)
        spec = {"defense": name, "model": model, "config": cfg.model_dump(mode="json")}
        run = _open_run("defend", f"{name}-{Path(model).name}", spec, out, resume)
        console.print(f"run directory: {run.path}")
        notes: list[str] = []
        with _discard_on_bad_input(run):
            if hasattr(defense, "preflight"):  # the defense's own settings, then its harmful data, before the mix
                defense.preflight(model)
            if hasattr(defense, "harmful_data"):
                defense.harmful_data(notes)
                for note in notes:
                    console.print(f"[yellow]warning:[/] {note}")
                notes.clear()
            ref = run_alignment_defense(defense, model, run.path, notes=notes)
        for note in notes:
            console.print(note, markup=False, highlight=False)
        metrics: dict[str, Any] = {}
        if eval_:
            metrics = evaluate_tuned(ref, run, limit=eval_limit, over_refusal=True, max_new_tokens=max_new_tokens)
        run.finish(metrics=metrics or None, model=ref.model_dump(mode="json"))
        typer.echo(model_spec_string(ref))


def register(parent: typer.Typer) -> None:
    """Add ``defend`` to the top-level ``tunesec`` app."""
    parent.command("defend")(defend_command)
