"""Time of one matrix cell on SmolLM2-135M with its defended model cached (target: <= 6 minutes on 2 cores).

A 1 x 1 matrix (defense ``none``: the shipped aligned adapter; attack ``harmful-sft`` with its defaults) evaluated
at n = 100 harmful-mix prompts and 200 SST-2 sentences; the defended model's own measurement runs first (it is a
cache entry, not part of the cell), then the cell: attack, harmful evaluation, utility evaluation. Each part's
seconds come from the run directories. A fresh cache directory each time, so nothing is a cache hit.

Usage:
    python benchmarks/matrix.py [--model smollm2-135m-aligned] [--attack harmful-sft] [--limit 100] [--no-write]

Prints a table and appends a ``## Matrix cell`` section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(run: Path) -> float:
    """Wall seconds of a finished run directory, from run.json's created/finished stamps."""
    meta = json.loads((run / "run.json").read_text())
    start = datetime.fromisoformat(meta["created"])
    end = datetime.fromisoformat(meta["finished"])
    return (end - start).total_seconds()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-aligned")
    p.add_argument("--attack", default="harmful-sft")
    p.add_argument("--limit", type=int, default=100, help="harmful prompts per cell")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()

    from tunesec.matrix import run_matrix
    from tunesec.matrix.cells import CELL_FILE

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cfg = {
            "model": args.model,
            "defenses": ["none"],
            "attacks": [args.attack],
            "harmful": {"dataset": "harmful-mix", "limit": args.limit},
        }
        started = time.time()
        summary = run_matrix(cfg, out=Path(tmp) / "matrix", cache=cache)
        total = time.time() - started
        if summary["failed_cells"]:
            raise SystemExit(f"cell failed: {summary['failed_cells']}")
        cell_path = next((cache / "cells").glob(f"*/{CELL_FILE}")).parent
        cell = json.loads((cell_path / CELL_FILE).read_text())
        attack_run = next((cache / "attacks").glob("*/run.json")).parent
        parts = {
            "attack": _seconds(attack_run),
            "harmful eval": _seconds(cell_path / "eval-harmful"),
            "utility eval": _seconds(cell_path / "eval-utility"),
        }
        defended = summary["defended"][0]["seconds"]
    rows = [
        "| part | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in parts.items()),
        f"| **cell** (attack + evaluations; cached defended model) | **{parts['attack'] + cell['seconds']:.0f}** |",
        f"| defended model's own measurement (once per defense) | {defended:.0f} |",
        f"| whole command | {total:.0f} |",
    ]
    table = "\n".join(rows)
    m = cell["metrics"]
    summary_line = (
        f"`python benchmarks/matrix.py --model {args.model} --attack {args.attack} --limit {args.limit}`: defense "
        f"none, attack {args.attack} (defaults), harmful-mix n={m['harmful']['n']} (harmful "
        f"{100 * m['harmful']['value']:.0f}%), SST-2 n={m['utility']['n']} (accuracy "
        f"{100 * m['utility']['value']:.0f}%), 64 new tokens, default judge. Target: cell <= 360 s. "
        f"Other jobs on the machine: {os.getloadavg()[0]:.1f} load average at the end."
    )
    print(table)
    print(summary_line)
    if not args.no_write:
        machine = f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        with (ROOT / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Matrix cell — {stamp} — {machine}\n\n{table}\n\n{summary_line}\n")


if __name__ == "__main__":
    main()
