"""``tunesec certify`` and ``tunesec demo``: thin wrappers over :mod:`tunesec.certify` and :mod:`tunesec.demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def certify_command(
    base: Annotated[str, typer.Option("--base", help="The model before fine-tuning (alias, directory, adapter).")],
    tuned: Annotated[str, typer.Option("--tuned", help="The fine-tuned model (directory or adapter directory).")],
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Policy YAML (default: the shipped default policy).")
    ] = None,
    finetune_data: Annotated[
        str | None,
        typer.Option("--finetune-data", help="The fine-tuning data (file or dataset name), mined for triggers."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="New or empty run directory.")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an unfinished certification run (same arguments).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Local data directory for datasets.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Evaluate the base model again.")] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most N prompts per check and for the trigger scan.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="At most N new tokens per generation.")
    ] = None,
) -> None:
    """Certify TUNED against BASE: exit 0 PASS, 1 FAIL, 3 INCONCLUSIVE, 2 usage error."""
    from rich.console import Console

    from tunesec.certify import certify

    result = certify(
        base,
        tuned,
        policy=policy,
        finetune_data=finetune_data,
        out=out,
        data_dir=data_dir,
        use_cache=not no_cache,
        limit=limit,
        max_new_tokens=max_new_tokens,
        resume=resume,
    )
    console = Console()
    console.print(_verdict_table(result.verdict))
    colour = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}[result.verdict.decision]
    console.print(f"[bold {colour}]{result.verdict.decision}[/]: {result.verdict.summary}", highlight=False)
    console.print(f"report: {result.report}\ncertificate: {Path(result.run_dir) / 'certificate.json'}")
    raise typer.Exit(result.exit_code)


def demo_command(
    out: Annotated[Path | None, typer.Option("--out", help="Directory for the demo's runs (default: runs/).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Local data directory for datasets.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of the harmful fine-tune.")] = 60,
    benign_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of the benign fine-tune.")] = 12,
) -> None:
    """Run the embedded scenario: aligned model -> harmful and benign fine-tunes -> certify both."""
    from tunesec.demo import run_demo

    run_demo(out=out, data_dir=data_dir, steps=steps, benign_steps=benign_steps)


def register(parent: typer.Typer) -> None:
    """Add ``certify`` and ``demo`` to the top-level ``tunesec`` app."""
    parent.command("certify")(certify_command)
    parent.command("demo")(demo_command)


def _verdict_table(verdict: object) -> object:
    from rich.table import Table

    from tunesec.certify.verdict import Verdict

    assert isinstance(verdict, Verdict)
    table = Table(title=f"certification: {verdict.decision}")
    for col in ("check", "status", "observed", "interval", "threshold", "note"):
        table.add_column(col, justify="right" if col in ("observed", "interval", "threshold") else "left")
    styles = {"pass": "green", "fail": "bold red", "inconclusive": "yellow", "skipped": "dim"}
    for c in verdict.checks:
        signed = c.on == "change" or c.kind == "trigger"
        fmt = "{:+.3f}" if signed else "{:.3f}"
        table.add_row(
            c.name,
            f"[{styles[c.status]}]{c.status}[/]",
            "" if c.observed is None else fmt.format(c.observed),
            "" if c.ci_low is None or c.ci_high is None else f"[{fmt.format(c.ci_low)}, {fmt.format(c.ci_high)}]",
            "" if c.threshold is None else f"{c.op} {fmt.format(c.threshold)}",
            (f"n≈{c.samples_to_decide} decides it" if c.samples_to_decide else ""),
        )
    return table
