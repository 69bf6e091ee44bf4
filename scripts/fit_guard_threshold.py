"""Fit the output guard's threshold for `tunesec serve` on labelled responses the judge never trained on.

Rule, fixed before it was run: the highest threshold on the `default` judge's P(harmful) that blocks >= 95% of
the human-labelled harmful responses of the dev set. Dev set: GPTFuzz pairs (jailbreak responses of chat models,
human labels; `judge-gptfuzz`) that are not among the pairs the shipped judge was trained on (the seeded
`--cap 2000` sample of `scripts/train_judge.py`, reproduced here), minus every pair whose request is also an
AdvBench, JBB-harmful, JBB-benign or XSTest prompt (the sets `benchmarks/serve_guard.py` reports on). A seeded
sample of at most --n pairs is scored. Prints the threshold with the dev recall, precision and block rate of
benign-labelled responses (95% Wilson intervals) and writes them as JSON.

    python scripts/fit_guard_threshold.py --data ../shared/data --out runs/guard-threshold.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TARGET_RECALL = 0.95


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out}: exists; choose a new --out")

    from train_judge import assemble  # the judge's own training sample (same data, cap and seed)

    from tunesec.data import resolve_dataset
    from tunesec.data.judge_sets import load_source, normalize
    from tunesec.evals.metrics import wilson_interval
    from tunesec.judges import get_judge
    from tunesec.judges.base import JudgeInput

    trained, _ = assemble(args.data, 2000, 2000, 0)
    seen = {(normalize(p.prompt), normalize(p.response)) for p in trained}
    reported: set[str] = set()
    for name, opts in [("advbench", {}), ("jbb-harmful", {}), ("jbb-benign", {}), ("xstest", {"subset": "all"})]:
        for ex in resolve_dataset(name, **opts):
            reported.add(normalize(next(m.content for m in ex.messages if m.role == "user")))
    pairs, _ = load_source("gptfuzz", args.data)
    pool = [p for p in pairs if p.harmful is not None and (normalize(p.prompt), normalize(p.response)) not in seen]
    unseen = len(pool)
    pool = [p for p in pool if normalize(p.prompt) not in reported]
    rng = random.Random(args.seed)
    dev = sorted(rng.sample(range(len(pool)), min(args.n, len(pool))))
    rows = [pool[i] for i in dev]
    judge = get_judge("default")
    scores = judge.score([JudgeInput(prompt=p.prompt, response=p.response) for p in rows])
    probs = [float((s.detail or {}).get("p_harmful", s.score or 0.0)) for s in scores]
    pos = sorted(pr for pr, p in zip(probs, rows, strict=True) if p.harmful)
    # the highest t with P(p >= t | harmful) >= 95%: the (5%)-quantile of the harmful responses' scores
    k = int(len(pos) * (1 - TARGET_RECALL))
    threshold = pos[k]
    blocked = [pr >= threshold for pr in probs]
    tp = sum(b and bool(p.harmful) for b, p in zip(blocked, rows, strict=True))
    fp = sum(b and not p.harmful for b, p in zip(blocked, rows, strict=True))
    n_pos, n_neg = len(pos), len(rows) - len(pos)

    def rate(k: int, n: int) -> dict[str, float]:
        lo, hi = wilson_interval(k, n)
        return {"value": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "k": k, "n": n}

    report = {
        "rule": f"highest threshold with dev recall >= {TARGET_RECALL}",
        "threshold": round(threshold, 4),
        "dev": {
            "source": "judge-gptfuzz",
            "pairs": len(pairs),
            "not_in_judge_training": unseen,
            "without_reported_requests": len(pool),
            "scored": len(rows),
            "harmful": n_pos,
            "benign": n_neg,
            "seed": args.seed,
        },
        "recall": rate(tp, n_pos),
        "precision": rate(tp, tp + fp),
        "benign_blocked": rate(fp, n_neg),
        "judge_decision": {  # the judge's own decision (threshold null), for comparison
            "recall": rate(sum(bool(s.harmful) and bool(p.harmful) for s, p in zip(scores, rows, strict=True)), n_pos),
            "benign_blocked": rate(
                sum(bool(s.harmful) and not p.harmful for s, p in zip(scores, rows, strict=True)), n_neg
            ),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
