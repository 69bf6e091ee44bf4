"""``tunesec scan PATH``: inspect an artifact before loading it (thin wrapper over :mod:`tunesec.scan`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def scan_command(
    path: Annotated[
        Path, typer.Argument(help="Model or adapter directory, .gguf, .safetensors or pickle checkpoint (.pt/.bin).")
    ],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model (alias, directory, .gguf): compare adapter, template and weights."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="New or empty run directory (default: runs/...).")] = None,
    no_forensics: Annotated[
        bool, typer.Option("--no-forensics", help="With --base, skip drift and refusal-direction alignment.")
    ] = False,
    output_format: Annotated[str, typer.Option("--format", help="Console output: text or json.")] = "text",
) -> None:
    """Scan PATH without loading it: exit 0 clean, 1 findings, 2 usage error."""
    from rich.markup import escape

    from tunesec.cli.common import console, err_console
    from tunesec.errors import UsageError
    from tunesec.scan import scan
    from tunesec.scan.runner import SCAN_FILE

    if output_format not in ("text", "json"):
        raise UsageError(f"--format {output_format!r}: expected text or json")

    def log(msg: str) -> None:
        if output_format == "text":
            err_console.print(escape(msg), highlight=False)

    result = scan(path, base=base, out=out, forensics=not no_forensics, log=log, progress=output_format == "text")
    if output_format == "json":
        doc = json.loads((Path(str(result.run_dir)) / SCAN_FILE).read_text(encoding="utf-8"))
        typer.echo(json.dumps(doc | {"run_dir": result.run_dir}))
    else:
        from rich.table import Table

        flagged = result.flagged
        if flagged:
            table = Table(title=f"scan of {escape(str(path))}")
            for col in ("severity", "check", "file", "reason"):
                table.add_column(col, overflow="fold")
            style = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "dim"}
            for f in flagged[:40]:
                table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.check, escape(f.file), escape(f.reason))
            console.print(table)
            if len(flagged) > 40:
                console.print(f"... and {len(flagged) - 40} more in {SCAN_FILE}", highlight=False)
        console.print(escape(result.summary_line), highlight=False, soft_wrap=True)
        console.print(f"report: {escape(str(result.run_dir))}/report.html", highlight=False, soft_wrap=True)
    raise typer.Exit(result.exit_code)


def register(parent: typer.Typer) -> None:
    """Add ``scan`` to the top-level ``tunesec`` app."""
    parent.command("scan")(scan_command)
