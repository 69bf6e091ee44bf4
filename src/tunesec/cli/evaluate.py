"""``tunesec eval``, ``tunesec report`` and ``tunesec compare``: thin wrappers over :mod:`tunesec.evals`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tunesec.errors import UsageError

if TYPE_CHECKING:
    from tunesec.evals.compare import Comparison
    from tunesec.evals.metrics import MetricValue

app = typer.Typer(help="Evaluate models, render reports and compare runs.", no_args_is_help=True)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model: alias, directory, .gguf file, hub id or openai:NAME.")],
    task: Annotated[
        str | None, typer.Option(help="Task: harmfulness, over-refusal or utility (default: harmfulness).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name or file path (default: the task's dataset).")
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option",
            help="Task argument KEY=VALUE (repeatable): scoring=choices for utility (the most likely label), "
            "prefill=target, prefill=response:K (first K words of the reference answer) or prefill=TEXT for "
            "harmfulness (the prefilling attack: answers forced to start so).",
        ),
    ] = None,
    judge: Annotated[str | None, typer.Option(help="Judge name (default: the task's judge).")] = None,
    judge_option: Annotated[
        list[str] | None,
        typer.Option(
            "--judge-option",
            help="Judge argument KEY=VALUE, e.g. grader=openai:gpt-4o-mini for strongreject-rubric (repeatable).",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate a seeded sample of N examples.")] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an unfinished run; its finished samples are kept.")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens to generate per prompt (default: the task's: 256 for harmfulness, 128 for over-refusal).",
        ),
    ] = None,
    batch_size: Annotated[str | None, typer.Option(help="Prompts per batch: a number or 'auto'.")] = None,
    dataset_option: Annotated[
        list[str] | None,
        typer.Option("--dataset-option", help="Dataset loader option KEY=VALUE, e.g. subset=unsafe (repeatable)."),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, decoding and bootstrap intervals.")] = 0,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle weight files (unsafe: they can run code).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the model repository's own code (unsafe).")] = False,
) -> None:
    """Evaluate MODEL on a task; writes a run directory with records, metrics.json and report.html."""
    from tunesec.evals import evaluate

    generation: dict[str, Any] = {}
    if max_new_tokens is not None:
        generation["max_new_tokens"] = max_new_tokens
    if batch_size is not None:
        generation["batch_size"] = _batch_size(batch_size)
    report = evaluate(
        model,
        task=task,
        dataset=dataset,
        judge=judge,
        judge_options=_key_values("--judge-option", judge_option),
        task_options=_key_values("--task-option", task_option) if task_option else None,
        limit=limit,
        out=out,
        resume=resume,
        generation=generation,
        dataset_options=_key_values("--dataset-option", dataset_option) if dataset_option else None,
        data_dir=data_dir,
        seed=seed,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    from rich.console import Console

    console = Console()
    console.print(_metrics_table(f"{report.label} ({report.counts.get('records', 0)} samples)", report.metrics))
    if report.counts.get("unparsed"):
        console.print(f"[yellow]{report.counts['unparsed']} samples unparsed (see the worst-case metrics)[/]")
    if report.run_dir is not None:
        console.print(f"run: {report.run_dir}\nreport: {Path(report.run_dir) / 'report.html'}")


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="An evaluation or certification run directory.")],
    out: Annotated[Path | None, typer.Option(help="Write the HTML here (default: RUN_DIR/report.html).")] = None,
) -> None:
    """Re-render report.html of an evaluation run (records, metrics) or a certification run (certificate)."""
    import json

    from rich.console import Console

    console = Console()
    if (run_dir / "certificate.json").is_file():
        from pydantic import ValidationError

        from tunesec.certify.certificate import Certificate
        from tunesec.certify.report import render_certificate

        cert_path = run_dir / "certificate.json"
        try:
            cert = Certificate.model_validate(json.loads(cert_path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, ValidationError) as err:
            first = str(err).splitlines()[0]
            raise UsageError(f"{cert_path}: not a certificate tunesec can read ({first})") from None
        path = render_certificate(run_dir, cert, out=out)
        console.print(f"{cert.decision}: {cert.verdict.summary}", highlight=False, soft_wrap=True)
        console.print(f"report: {path}")
        return

    from tunesec.evals.report import render_report
    from tunesec.evals.runner import EvalReport

    path = render_report(run_dir, out)
    report = EvalReport.load(run_dir)
    console.print(_metrics_table(report.label, report.metrics))
    console.print(f"report: {path}")


@app.command("compare")
def compare_command(
    run_a: Annotated[Path, typer.Argument(help="Reference run (e.g. the base model).")],
    run_b: Annotated[Path, typer.Argument(help="Run compared with it (e.g. the fine-tuned model).")],
    html: Annotated[Path | None, typer.Option(help="Also write the comparison as an HTML page.")] = None,
) -> None:
    """Compare two evaluation runs of the same task: B - A per metric, with intervals and significance."""
    from rich.console import Console

    from tunesec.evals.compare import compare_runs

    comparison = compare_runs(run_a, run_b)
    console = Console()
    for warning in comparison.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    console.print(_comparison_table(comparison))
    for field, f in comparison.flips.items():
        if f["became"] or f["stopped"]:
            shown = ", ".join(map(str, f["became"][:5])) + (" ..." if len(f["became"]) > 5 else "")
            console.print(
                f"per prompt ({f['shared']} shared): {len(f['became'])} became {field}, {len(f['stopped'])} stopped"
                + (f"; became: {shown}" if f["became"] else ""),
                highlight=False,
                soft_wrap=True,
            )
    if html is not None:
        from tunesec.evals.report import render_comparison

        console.print(f"html: {render_comparison(comparison, html)}")


def register(parent: typer.Typer) -> None:
    """Add ``eval``, ``report`` and ``compare`` to the top-level ``tunesec`` app."""
    parent.command("eval")(eval_command)
    parent.command("report")(report_command)
    parent.command("compare")(compare_command)


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--batch-size: expected a positive integer or 'auto', got {value!r}")
    return n


def _key_values(option: str, items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def _metrics_table(title: str, metrics: dict[str, MetricValue]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "value", "interval", "n", "k", "method"):
        table.add_column(col, justify="left" if col in ("metric", "method") else "right")
    for m in metrics.values():
        table.add_row(
            m.name,
            f"{m.value:.4f}",
            f"[{m.ci_low:.4f}, {m.ci_high:.4f}]",
            str(m.n),
            "" if m.k is None else str(m.k),
            m.method,
        )
    return table


def _comparison_table(comparison: Comparison) -> Any:
    from rich.table import Table

    table = Table(title=f"{comparison.task}: B - A  (A = {comparison.model_a}, B = {comparison.model_b})")
    for col in ("metric", "A", "B", "B - A", "interval", "method", "change"):
        table.add_column(col, justify="left" if col in ("metric", "method", "change") else "right")
    for d in comparison.diffs:
        if d.significant:
            # Neutral colour: an increase is bad for harmful_rate but good for accuracy.
            change = "[bold yellow]significant " + ("increase" if d.diff > 0 else "decrease") + "[/]"
        else:
            change = "no significant change"
        table.add_row(
            d.name,
            f"{d.a:.4f}",
            f"{d.b:.4f}",
            f"{d.diff:+.4f}",
            f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]",
            d.method,
            change,
        )
    return table
