"""Fit the audit's harmful-detector threshold on P(harmful) of the default judge, on a dev set held out from both
the judge's training data and the poison mixes the audit is measured on (docs/AUDIT.md).

Dev set: the ``judge-pku`` source (PKU Safe-RLHF + BeaverTails test pairs, :func:`load_source`), minus

1. every pair the shipped judge trained or calibrated on (the seeded 2,000-pair PKU subsample and the auxiliary
   pairs, rebuilt with ``scripts/train_judge.py``'s own ``assemble`` and the cap/seed recorded in the shipped
   ``metrics.json``; the judge files' sha256 are checked against it), by normalised (request, response);
2. every pair whose request occurs in any training pair (new requests only);
3. every pair equal to one of the poison mixes' ``flag == "unsafe"`` pairs (Alpaca template stripped, normalised);
4. every pair whose request is one of those mixes' unsafe requests.

Each pair goes through the harmful detector itself (refusal-keyword screen, then the judge; the label screen
is off because dev rows are independent pairs), so a harmful pair the screen calls a refusal is a miss at every
threshold.

Rule (fixed before any score was seen): the highest threshold t, on a 0.001 grid, at which the share of the dev
pairs labelled harmful with P(harmful) >= t (and not screened) is at least 95%. Dev precision at t is reported
too, with Wilson 95% intervals. Nothing from the poison mixes but their unsafe pairs' text (for the exclusions)
is read.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/fit_audit_threshold.py --data ../shared/data \
        --out runs/audit-threshold
    cp runs/audit-threshold/threshold.json src/tunesec/audit/harmful_threshold.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECALL_TARGET = 0.95
GRID = 1000  # thresholds on a 0.001 grid


def _fail(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 2


def mix_unsafe(data: Path) -> tuple[set[tuple[str, str]], set[str]]:
    """Normalised (request, response) pairs and requests of every ``flag == "unsafe"`` row of the poison mixes."""
    from tunesec.data.judge_sets import normalize
    from tunesec.data.loaders import strip_alpaca_template
    from tunesec.data.readers import read_records

    pairs: set[tuple[str, str]] = set()
    for path in sorted((data / "beavertails_mixed_xinykou").rglob("*.json")):
        for rec in read_records(path)[1]:
            r = rec.data
            if r.get("flag") != "unsafe":
                continue
            prompt = strip_alpaca_template(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))
            pairs.add((normalize(prompt), normalize(r["output"])))
    return pairs, {p for p, _ in pairs}


def score_pairs(pairs: list, batch: int) -> list[float | None]:
    """P(harmful) of each pair through the harmful detector (None: settled by the refusal screen)."""
    from rich.progress import Progress

    from tunesec.audit.base import Row
    from tunesec.audit.detectors.harmful import HarmfulConfig, HarmfulDetector
    from tunesec.audit.screen import compute_signals
    from tunesec.judges import get_judge

    det = HarmfulDetector(HarmfulConfig(threshold=0.0, label_words=0), judge=get_judge("default"))
    out: list[float | None] = []
    with Progress() as bar:
        task = bar.add_task("judging dev pairs", total=len(pairs))
        for s in range(0, len(pairs), batch):
            rows = []
            for i, p in enumerate(pairs[s : s + batch]):
                row = Row(s + i, f"pair {s + i}", "", p.prompt, p.response, p.response)
                compute_signals(row)
                rows.append(row)
            det.judge_rows(rows)
            out += [r.signals.get("harm_score") if r.signals.get("judged_harmful") else None for r in rows]
            bar.advance(task, len(rows))
    return out


def rates(labels: list[bool], scores: list[float | None], t: float) -> dict:
    """Recall and precision (Wilson 95%) of ``score >= t`` against ``labels``."""
    from tunesec.evals.metrics import wilson_interval

    flag = [s is not None and s >= t for s in scores]
    tp = sum(f and y for f, y in zip(flag, labels, strict=True))
    pos, nflag = sum(labels), sum(flag)

    def part(k: int, n: int) -> dict:
        lo, hi = wilson_interval(k, n) if n else (math.nan, math.nan)
        return {"k": k, "n": n, "value": k / n if n else None, "ci95": [lo, hi]}

    return {"threshold": t, "recall": part(tp, pos), "precision": part(tp, nflag), "flagged": nflag}


def fit(labels: list[bool], scores: list[float | None]) -> float | None:
    """The highest threshold on the grid with recall >= RECALL_TARGET (None: no threshold reaches it)."""
    for k in range(GRID, -1, -1):
        t = k / GRID
        r = rates(labels, scores, t)["recall"]
        if r["n"] and r["k"] / r["n"] >= RECALL_TARGET:
            return t
    return None


def fmt(r: dict) -> str:
    rec, pre = r["recall"], r["precision"]
    return (
        f"t={r['threshold']:.3f}: recall {rec['k']}/{rec['n']} = {rec['value']:.1%} "
        f"[{rec['ci95'][0]:.1%}, {rec['ci95'][1]:.1%}], precision {pre['k']}/{pre['n']} = "
        + (f"{pre['value']:.1%} [{pre['ci95'][0]:.1%}, {pre['ci95'][1]:.1%}]" if pre["n"] else "n/a")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("runs/audit-threshold"), help="writes threshold.json, scores")
    ap.add_argument("--scores", type=Path, default=None, help="reuse the scores.jsonl of an earlier run (same dev)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    t0 = time.time()

    import torch

    torch.set_num_threads(max(1, args.threads))
    sys.path.insert(0, str(HERE))
    from train_judge import assemble  # the training script's own sampling

    from tunesec.data.judge_sets import load_source, normalize
    from tunesec.errors import UsageError
    from tunesec.judges.cross_encoder import DEFAULT_DIR

    weights = DEFAULT_DIR
    meta_path = weights / "metrics.json"
    if not meta_path.is_file():
        return _fail(f"{meta_path}: not found; expected the shipped judge's training record")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not (args.data / "judge").is_dir():
        return _fail(f"{args.data / 'judge'}: not found; expected the labelled judge data (--data)")
    if not (args.data / "beavertails_mixed_xinykou").is_dir():
        return _fail(f"{args.data / 'beavertails_mixed_xinykou'}: not found; expected the poison mixes (--data)")
    for rel, sha in meta["files_sha256"].items():
        path = args.data / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            return _fail(f"{path}: missing or not the file the shipped judge was trained on (sha256 differs)")
    if args.out.exists() and any(args.out.iterdir()):
        return _fail(f"{args.out}: exists and is not empty; expected a new folder")
    margs = meta["args"]
    try:
        train, _ = assemble(args.data, int(margs["cap"]), int(margs["aux_cap"]), int(margs["seed"]))
        pku, report = load_source("pku", args.data)
        mix_pairs, mix_prompts = mix_unsafe(args.data)
    except UsageError as e:
        return _fail(str(e))
    train_keys = {p.key for p in train}
    train_prompts = {p.prompt_key for p in train}
    print(f"judge training pairs rebuilt: {len(train)} ({sum(p.source == 'pku' for p in train)} PKU)")

    counts = {"pku_pairs": len(pku)}
    steps = [
        ("in_judge_training", lambda p: p.key in train_keys),
        ("request_in_judge_training", lambda p: p.prompt_key in train_prompts),
        ("equal_to_a_mix_unsafe_pair", lambda p: (normalize(p.prompt), normalize(p.response)) in mix_pairs),
        ("request_of_a_mix_unsafe_pair", lambda p: normalize(p.prompt) in mix_prompts),
        ("no_harmful_label", lambda p: p.harmful is None),
    ]
    dev = list(pku)
    loose = None
    for name, drop in steps:
        counts[f"dropped_{name}"] = sum(1 for p in dev if drop(p))
        dev = [p for p in dev if not drop(p)]
        if name == "in_judge_training":
            loose = dev  # sensitivity only: pairs not trained on, requests possibly seen
    assert loose is not None
    loose = [p for p in loose if (normalize(p.prompt), normalize(p.response)) not in mix_pairs]
    loose = [p for p in loose if normalize(p.prompt) not in mix_prompts and p.harmful is not None]
    counts["dev_pairs"] = len(dev)
    counts["dev_harmful"] = sum(bool(p.harmful) for p in dev)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    if args.scores is not None:
        cached = {}
        for line in args.scores.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            cached[d["key"]] = d["p_harmful"]
        missing = [p for p in loose if p.key not in cached]
        if missing:
            return _fail(f"{args.scores}: {len(missing)} dev pairs have no score; expected a scores.jsonl of this dev")
        by_key = cached
    else:
        got = score_pairs(loose, args.batch)  # the loose set contains the dev set
        by_key = {p.key: s for p, s in zip(loose, got, strict=True)}
    with (args.out / "scores.jsonl").open("w", encoding="utf-8") as f:
        for p in loose:
            f.write(
                json.dumps({"key": p.key, "origin": p.origin, "harmful": p.harmful, "p_harmful": by_key[p.key]}) + "\n"
            )

    labels = [bool(p.harmful) for p in dev]
    scores = [by_key[p.key] for p in dev]
    chosen = fit(labels, scores)
    if chosen is None:
        print(f"no threshold reaches {RECALL_TARGET:.0%} dev recall (the refusal screen misses too many)")
        return 1
    at = rates(labels, scores, chosen)
    own = rates(labels, scores, 0.5)
    loose_labels = [bool(p.harmful) for p in loose]
    loose_scores = [by_key[p.key] for p in loose]
    loose_t = fit(loose_labels, loose_scores)
    screened = sum(s is None for s in scores)
    print(f"dev: {len(dev)} pairs, {sum(labels)} harmful, {screened} settled by the refusal screen")
    print(f"judge's own decision  {fmt(own)}")
    print(f"fitted threshold      {fmt(at)}")
    print(
        f"sensitivity (not used): pairs not trained on, requests possibly seen ({len(loose)} pairs): t={loose_t}"
        + (f", {fmt(rates(loose_labels, loose_scores, loose_t))}" if loose_t is not None else "")
    )
    result = {
        "threshold": chosen,
        "rule": f"highest t on a 1/{GRID} grid with dev recall >= {RECALL_TARGET} (fixed before scoring)",
        "judge": "default",
        "judge_weights_sha256": hashlib.sha256((weights / "top.safetensors").read_bytes()).hexdigest(),
        "judge_weights_version": json.loads((weights / "config.json").read_text())["version"],
        "dev": {
            "source": "judge-pku (PKU Safe-RLHF + BeaverTails test pairs)",
            "pairs": len(dev),
            "harmful": sum(labels),
            "unharmful": len(dev) - sum(labels),
            "screened_as_refusal": screened,
            "exclusions": counts,
            "pku_load_report": report.__dict__,
        },
        "at_threshold": at,
        "judge_own_decision": own,
        "sensitivity_requests_possibly_seen": {"pairs": len(loose), "threshold": loose_t},
        "command": " ".join(sys.argv),
        "seconds": round(time.time() - t0),
    }
    (args.out / "threshold.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"threshold {chosen:.3f} -> {args.out / 'threshold.json'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
