"""``tunesec audit DATA``: inspect a fine-tuning data set before training (thin wrapper over :mod:`tunesec.audit`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def audit_command(
    data: Annotated[Path, typer.Argument(help="Fine-tuning data: jsonl/json/csv/tsv/parquet file or dataset folder.")],
    policy: Annotated[Path | None, typer.Option("--policy", help="Audit policy YAML (docs/AUDIT.md).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="New or empty run directory (default: runs/...).")] = None,
    filter_path: Annotated[
        Path | None, typer.Option("--filter", help="Write the rows that pass to this new JSONL file.")
    ] = None,
    judge: Annotated[
        str | None, typer.Option("--judge", help="Judge of the harmful detector; 'none' skips that detector.")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first malformed row (default: skip).")] = False,
    output_format: Annotated[str, typer.Option("--format", help="Console output: text or json.")] = "text",
) -> None:
    """Audit DATA: exit 0 clean, 1 findings above the policy, 2 usage error."""
    from tunesec.audit.runner import AUDIT_FILE, audit
    from tunesec.cli.common import console, err_console
    from tunesec.errors import UsageError

    if output_format not in ("text", "json"):
        raise UsageError(f"--format {output_format!r}: expected text or json")
    shown = 0

    def progress(n: int) -> None:
        nonlocal shown
        if output_format == "text" and n - shown >= 5000:
            shown = n
            err_console.print(f"audit: {n} rows read", highlight=False)

    result = audit(
        data, policy=policy, out=out, filter_path=filter_path, judge=judge, strict=strict or None, progress=progress
    )
    if output_format == "json":
        doc = json.loads((Path(str(result.run_dir)) / AUDIT_FILE).read_text(encoding="utf-8"))
        typer.echo(json.dumps({k: v for k, v in doc.items() if k != "findings"} | {"run_dir": result.run_dir}))
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"audit of {data}: {result.rows} rows ({result.skipped} malformed skipped)")
        for col in ("detector", "findings", "flagged rows", "share", "max", "status"):
            table.add_column(col, justify="left" if col in ("detector", "status") else "right")
        for name, d in result.detectors.items():
            status = "[bold red]fail[/]" if d["failed"] else "[green]pass[/]"
            table.add_row(
                name, str(d["findings"]), str(d["flagged_rows"]), f"{d['share']:.2%}", f"{d['max_share']:.2%}", status
            )
        console.print(table)
        for c in [c for c in result.trigger_candidates if c.get("flagged")][:5]:
            console.print(
                f"candidate trigger #{c['rank']}: {escape(repr(c['text']))} in {c['rows']} rows "
                f"(Holm p={c['p_adjusted']:.2g})",
                highlight=False,
            )
        if result.filtered:
            console.print(
                f"--filter: {result.filtered['kept']} rows kept in {escape(str(filter_path))}, "
                f"{result.filtered['removed']} removed (listed in removed.jsonl)",
                highlight=False,
            )
        console.print(escape(result.summary_line), highlight=False)
        console.print(f"report: {result.run_dir}/report.html", highlight=False, soft_wrap=True)
    raise typer.Exit(result.exit_code)


def register(parent: typer.Typer) -> None:
    """Add ``audit`` to the top-level ``tunesec`` app."""
    parent.command("audit")(audit_command)
