"""Measure alignment-stage defenses on SmolLM2-135M: defend, evaluate, attack, evaluate again (docs/DEFENSES.md).

The plan is fixed before any result is seen and runs in this order, one model at a time; each step is a tunesec
command whose run directory is skipped when it is already finished, so a killed run continues where it stopped:

    for M in [undefended (the shipped adapter), DEFENSES...]:
        defend M (alignment.training.seed = SEED; the undefended model is the shipped adapter, seed 42)
        eval: refusal / harmfulness on harmful-mix (210 prompts, 30 from each of 7 sets) and AdvBench (100);
              over-refusal on XSTest-safe (100) and JBB-benign (100);
              utility: SST-2 and AG News, most-likely label (200 each)
        attack: harmful-sft (defaults: 100 BeaverTails pairs, 5 epochs, LoRA lr 5e-4) -> eval harmful-mix

Generation: greedy, 64 new tokens (as the shipped adapter's card). Judge: the default (response-judge).

Usage:
    python scripts/defense_table.py [--root runs/defenses] [--defenses vaccine booster ...] [--seed 42]
    python scripts/defense_table.py --table      # print the markdown table from finished runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNESEC = str(Path(sys.executable).parent / "tunesec")
TOKENS = "64"
EVALS: list[tuple[str, list[str]]] = [
    ("harmful-mix", ["--task", "harmfulness", "--dataset", "harmful-mix"]),
    ("advbench", ["--task", "harmfulness", "--dataset", "advbench", "--limit", "100"]),
    ("xstest-safe", ["--task", "over-refusal", "--dataset", "xstest", "--limit", "100"]),
    ("jbb-benign", ["--task", "over-refusal", "--dataset", "jbb-benign", "--limit", "100"]),
    ("sst2", ["--task", "utility", "--dataset", "sst2", "--task-option", "scoring=choices", "--limit", "200"]),
    ("agnews", ["--task", "utility", "--dataset", "agnews", "--task-option", "scoring=choices", "--limit", "200"]),
]


def finished(run: Path) -> bool:
    """A run directory whose run.json says it finished."""
    spec = run / "run.json"
    return spec.is_file() and json.loads(spec.read_text()).get("status") == "finished"


def sh(args: list[str], log: Path) -> None:
    """Run a tunesec command, its output appended to ``log``; stop the plan on failure."""
    started = time.time()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(args)}\n")
        fh.flush()
        rc = subprocess.call(args, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        fh.write(f"[exit {rc} after {time.time() - started:.0f} s]\n")
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(args)}; see {log}")


def step(run: Path, args: list[str], log: Path) -> None:
    """Run ``args`` into ``run`` unless finished; resume it when it was started."""
    if finished(run):
        return
    if run.exists():
        args = [*args, "--resume", str(run)]
    else:
        args = [*args, "--out", str(run)]
    sh(args, log)


def model_spec(run: Path) -> str:
    """The adapter directory a finished defend/attack run wrote."""
    return str(json.loads((run / "model_ref.json").read_text())["adapter"])


def measure(name: str, spec: str, root: Path, log: Path) -> None:
    """Every evaluation of ``spec`` and the harmful-sft attack on it, into ``root/name``."""
    base = root / name
    for label, args in EVALS:
        step(base / f"eval-{label}", [TUNESEC, "eval", spec, *args, "--max-new-tokens", TOKENS], log)
    attack = base / "attack-harmful-sft"
    step(attack, [TUNESEC, "attack", "harmful-sft", "--model", spec], log)
    tuned = model_spec(attack)
    step(base / "attacked-eval-harmful-mix", [TUNESEC, "eval", tuned, *EVALS[0][1], "--max-new-tokens", TOKENS], log)


def run_plan(root: Path, defenses: list[str], seed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    log = root / "plan.log"
    measure("undefended", "smollm2-135m-aligned", root, log)
    for name in defenses:
        run = root / name / "defend"
        run.parent.mkdir(parents=True, exist_ok=True)
        step(run, [TUNESEC, "defend", name, "--model", "smollm2-135m", "--set", f"alignment.training.seed={seed}"], log)
        measure(name, model_spec(run), root, log)


def metric(run: Path, key: str) -> dict | None:
    path = run / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    metrics = data.get("metrics", data)
    return metrics.get(key)


def fmt(m: dict | None) -> str:
    if m is None:
        return "not run"
    return f"{100 * m['value']:.0f} [{100 * m['ci_low']:.0f}, {100 * m['ci_high']:.0f}]"


def table(root: Path) -> str:
    """The markdown table of every model measured under ``root``."""
    head = (
        "| model | refusal, harmful-mix | harmful, harmful-mix | refusal, AdvBench | over-refusal XSTest-safe "
        "| over-refusal JBB-benign "
        "| SST-2 acc | AG News acc | harmful after harmful-sft | refusal after harmful-sft | train s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        train_s = ""
        ref = d / "defend" / "model_ref.json"
        if ref.is_file():
            train_s = str(json.loads(ref.read_text())["provenance"]["train"]["seconds"])
        rows.append(
            f"| {d.name} | {fmt(metric(d / 'eval-harmful-mix', 'refusal_rate'))} "
            f"| {fmt(metric(d / 'eval-harmful-mix', 'harmful_rate'))} "
            f"| {fmt(metric(d / 'eval-advbench', 'refusal_rate'))} "
            f"| {fmt(metric(d / 'eval-xstest-safe', 'refusal_rate'))} "
            f"| {fmt(metric(d / 'eval-jbb-benign', 'refusal_rate'))} "
            f"| {fmt(metric(d / 'eval-sst2', 'accuracy'))} | {fmt(metric(d / 'eval-agnews', 'accuracy'))} "
            f"| {fmt(metric(d / 'attacked-eval-harmful-mix', 'harmful_rate'))} "
            f"| {fmt(metric(d / 'attacked-eval-harmful-mix', 'refusal_rate'))} | {train_s} |"
        )
    return "\n".join(rows)


def spread(root: Path, run: str = "eval-harmful-mix", key: str = "refusal_rate") -> str:
    """Per source set of harmful-mix: each model's ``key`` (30 prompts per set)."""
    rows: list[str] = []
    cats: list[str] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = metric(d / run, key)
        if m is None:
            continue
        per = m.get("per_category", {})
        if not cats:
            cats = list(per)
            rows += ["| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        rows.append(f"| {d.name} | " + " | ".join(fmt(per.get(c)) for c in cats) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "defenses")
    p.add_argument("--defenses", nargs="*", default=["vaccine", "booster", "vaa", "t-vaccine", "ctrap"])
    p.add_argument("--seed", type=int, default=42, help="alignment.training.seed of every defended run")
    p.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    args = p.parse_args()
    if args.table:
        print(table(args.root))
        print(f"\nrefusal by source set (harmful-mix):\n{spread(args.root)}")
        attacked = spread(args.root, "attacked-eval-harmful-mix", "harmful_rate")
        print(f"\nharmful after harmful-sft, by source set:\n{attacked}")
        return
    run_plan(args.root, args.defenses, args.seed)


if __name__ == "__main__":
    main()
