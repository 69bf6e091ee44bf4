"""``tunesec judge FILE``: score (prompt, response) pairs with a judge; with labels, check the judge against them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesec.cli.common import console, err_console


def judge_command(
    file: Annotated[Path, typer.Argument(help="JSONL, JSON, CSV, TSV or parquet file of (prompt, response) rows.")],
    judge: Annotated[str, typer.Option(help="Judge name (tunesec list judges).")] = "default",
    labels: Annotated[
        str | None, typer.Option(help="Field of 0/1/true/false labels: prints agreement with intervals.")
    ] = None,
    label_kind: Annotated[
        str, typer.Option(help="What the labels say: harmful (harmful compliance) or refused.")
    ] = "harmful",
    out: Annotated[
        Path | None, typer.Option(help="New or empty folder for scores.jsonl, agreement.json, mismatches.jsonl.")
    ] = None,
    prompt_field: Annotated[str, typer.Option(help="Field of the request.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="Field of the response.")] = "response",
    max_chars: Annotated[int, typer.Option(min=1, help="Longest accepted prompt or response, in characters.")] = 32000,
    judge_option: Annotated[
        list[str] | None, typer.Option("--judge-option", help="Judge argument KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Score every row of FILE with a judge; with --labels, print agreement and a confusion matrix."""
    from rich.table import Table

    from tunesec.cli.evaluate import _key_values
    from tunesec.evals.judge_file import judge_file
    from tunesec.judges import get_judge
    from tunesec.progress import make_progress

    j = get_judge(judge, **_key_values("--judge-option", judge_option))
    bar = make_progress()
    task = None

    def progress(done: int, total: int) -> None:
        # Started at the first scored batch: the file is read and checked before anything is shown.
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("judging", total=total)
        bar.update(task, completed=done)

    try:
        result = judge_file(
            file,
            j,
            label_field=labels,
            label_kind=label_kind,  # type: ignore[arg-type]
            prompt_field=prompt_field,
            response_field=response_field,
            max_chars=max_chars,
            out=out,
            progress=progress,
        )
    finally:
        bar.stop()
    n = len(result.scores)
    harmful = sum(bool(s.harmful) for s in result.scores)
    refused = sum(bool(s.refused) for s in result.scores)
    unparsed = sum(s.unparsed for s in result.scores)
    console.print(
        f"{file}: {n} rows judged by {judge}: {harmful} harmful, {refused} refused, {unparsed} unparsed",
        soft_wrap=True,
        highlight=False,
    )
    a = result.agreement
    if a is not None:
        table = Table(title=f"agreement with {labels!r} ({label_kind}), n={a.n}, 95% intervals")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, stat, pct in (
            ("accuracy %", a.accuracy, True),
            ("precision %", a.precision, True),
            ("recall %", a.recall, True),
            ("F1", a.f1, False),
            ("Cohen's kappa", a.kappa, False),
            ("ECE", a.ece, False),
        ):
            table.add_row(name, stat.fmt(pct))
        console.print(table)
        cm = Table(title="confusion matrix (rows: label, columns: judge)")
        cm.add_column("")
        cm.add_column("judge: yes", justify="right")
        cm.add_column("judge: no", justify="right")
        cm.add_row("label: yes", str(a.tp), str(a.fn))
        cm.add_row("label: no", str(a.fp), str(a.tn))
        console.print(cm)
        if a.unparsed:
            err_console.print(f"{a.unparsed} rows unparsed: mismatches, not in the rates", soft_wrap=True)
    if out is not None:
        more = f" ({len(result.mismatches)} mismatches in mismatches.jsonl)" if a else ""
        console.print(f"wrote {out}/{more}", soft_wrap=True, highlight=False)


def register(parent: typer.Typer) -> None:
    """Add ``judge`` to the top-level ``tunesec`` app."""
    parent.command("judge")(judge_command)
