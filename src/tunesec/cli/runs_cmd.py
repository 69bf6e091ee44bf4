"""``tunesec runs [DIR]``: list the run directories under DIR with what each measured and its headline result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tunesec.cli.common import console
from tunesec.errors import UsageError


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def describe(run_dir: Path) -> dict[str, str] | None:
    """One row for a run directory (``None`` when it holds no readable run.json)."""
    from tunesec.evals.compare import model_label
    from tunesec.evals.runner import run_label

    meta = _read(run_dir / "run.json")
    if meta is None:
        return None
    spec = meta.get("spec") or {}
    kind = str(meta.get("kind", "?"))
    row = {"run": run_dir.name, "kind": kind, "status": str(meta.get("status", "?")), "what": "", "result": ""}
    model_name = model_label(spec)
    if kind == "eval":
        row["what"] = f"{run_label(spec.get('task') or {}, spec.get('dataset') or {})} on {model_name}".strip()
        metrics = (_read(run_dir / "metrics.json") or {}).get("metrics") or {}
        head = next(iter(metrics.values()), None)
        if isinstance(head, dict) and "value" in head:
            row["result"] = f"{head['name']} {head['value']:.3f} [{head['ci_low']:.3f}, {head['ci_high']:.3f}]"
    elif kind == "attack":
        row["what"] = f"{spec.get('attack', '?')} on {model_name}"
        parts = []
        for p in sorted(run_dir.glob("eval-*")):
            sub = describe(p) if (p / "metrics.json").is_file() else None
            if sub is not None:
                parts.append(f"{p.name[5:]}: {sub['result']}")
        row["result"] = "; ".join(parts)
    elif kind == "certify":
        cert = _read(run_dir / "certificate.json") or {}
        row["what"] = "certify"
        row["result"] = str(cert.get("decision", ""))
    else:
        row["what"] = str(meta.get("name", ""))
    return row


def runs_command(
    root: Annotated[Path, typer.Argument(help="Folder holding run directories.")] = Path("runs"),
) -> None:
    """List the runs under ROOT (newest last): kind, status, what was measured and the headline result."""
    from rich.table import Table

    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; expected a folder of run directories (default: runs/)")
    rows = [r for p in sorted(root.iterdir()) if p.is_dir() and (r := describe(p)) is not None]
    table = Table(title=f"runs in {root}")
    for col in ("run", "kind", "status", "what", "result"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["run"], r["kind"], r["status"], r["what"], r["result"])
    console.print(table)
    if not rows:
        console.print(f"no runs in {root}")


def register(parent: typer.Typer) -> None:
    """Add ``runs`` to the top-level ``tunesec`` app."""
    parent.command("runs")(runs_command)
