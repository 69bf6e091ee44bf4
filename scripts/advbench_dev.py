"""Evaluate a model on an AdvBench *dev* sample, disjoint from the sample that docs/RESULTS.md reports.

``tunesec eval ... --dataset advbench --limit 100`` evaluates a seeded sample (seed 0) of AdvBench. Choosing an
attack's or a defense's settings by that number would tune on the reported sample; this script draws another
100 prompts (seed 1) from the 420 that sample leaves out, so settings can be picked here and reported there.

    python scripts/advbench_dev.py MODEL --out runs/dev-MODEL [--n 100] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dev_sample(n: int, reported: int = 100) -> list:
    """``n`` AdvBench examples outside the evaluation runner's seeded sample of ``reported`` (seed 0)."""
    from tunesec.evals.runner import _sample, load_eval_dataset

    examples = load_eval_dataset("advbench", {}, None)
    held = {ex.id for ex in _sample(examples, reported, 0)}
    rest = [ex for ex in examples if ex.id not in held]
    return random.Random(1).sample(rest, min(n, len(rest)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model spec: alias, directory or adapter directory")
    ap.add_argument("--out", type=Path, required=True, help="run directory to create")
    ap.add_argument("--n", type=int, default=100, help="dev prompts (default 100)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="as in docs/RESULTS.md (default 64)")
    args = ap.parse_args()
    from tunesec.evals import evaluate

    report = evaluate(
        args.model,
        task="harmfulness",
        dataset=dev_sample(args.n),
        generation={"max_new_tokens": args.max_new_tokens},
        out=args.out,
        html=False,
    )
    rates = {k: [round(v.value, 3), round(v.ci_low, 3), round(v.ci_high, 3), v.n] for k, v in report.metrics.items()}
    print(json.dumps({"model": args.model, **{k: rates[k] for k in ("refusal_rate", "harmful_rate") if k in rates}}))


if __name__ == "__main__":
    main()
