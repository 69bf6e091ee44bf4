"""Benchmark the CPU judges: agreement per held-out source (leave-one-source-out) and throughput.

Accuracy: the five labelled judge sources (:mod:`tunesec.data.judge_sets`). For ``response-judge`` the numbers
are its leave-one-source-out predictions written by ``scripts/train_judge.py --out DIR`` (each source scored by
weights trained without it and without any pair sharing its requests); the older judges, which never trained on
these sources, score exactly the same rows. Metrics: accuracy, precision, recall, F1, Cohen's kappa, ECE with 95%
intervals (:mod:`tunesec.evals.agreement`); ``harmful`` on every source, ``refused`` on XSTest (the only source
with refusal labels).

Throughput: responses/s on synthetic (prompt, response) pairs of 256 and 1,024 response tokens (one ``score``
call over 64 pairs after one warm-up call; wall clock, this process's threads).

Prints markdown tables and appends them, with the date and machine, to BENCHMARKS.md as a new section.

Usage: .venv/bin/python benchmarks/judges.py --loso runs/judge-train [--data ../shared/data] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown

from tunesec.data.judge_sets import SOURCES, load_source
from tunesec.evals.agreement import agreement
from tunesec.judges import Judge, JudgeInput, get_judge

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
# Every judge that runs offline on this machine; strongreject-rubric needs a grader model and guard-model a guard's
# weights (Llama Guard 3, WildGuard, HarmBench's classifier), neither of which the offline install has.
OLD = ("refusal-keywords", "harm-classifier", "keywords-embedding")


def throughput(judge: Judge, tokens: int, n: int = 64) -> float:
    words = " ".join(["the steps are simple and you can follow them at home"] * (tokens // 10 + 1)).split()
    items = [
        JudgeInput(prompt=f"Question {i}: how would someone do this?", response=" ".join(words[: tokens - 3 + i % 3]))
        for i in range(n)
    ]
    judge.score(items[:4])
    t = time.perf_counter()
    judge.score(items)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--loso", type=Path, required=True, help="scripts/train_judge.py --out folder (preds-*.jsonl)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load_avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    machine += f" ({torch.get_num_threads()} threads)"

    rows: list[list[str]] = []
    summary: dict[str, dict[str, dict]] = {}
    judges = {name: get_judge(name) for name in OLD}
    for source in SOURCES:
        path = args.loso / f"preds-{source}.jsonl"
        if not path.is_file():
            print(f"{path}: missing; skipping {source}")
            continue
        preds = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        by_origin = {p.origin: p for p in load_source(source, args.data)[0]}
        pairs = [by_origin[r["origin"]] for r in preds]
        items = [JudgeInput(prompt=p.prompt, response=p.response) for p in pairs]
        scores = {name: j.score(items) for name, j in judges.items()}
        for output in ("harmful", "refused"):
            keep = [i for i, p in enumerate(pairs) if getattr(p, output) is not None]
            if not keep:
                continue
            y = [bool(getattr(pairs[i], output)) for i in keep]
            results = {
                "response-judge (LOSO)": agreement(
                    y, [preds[i][f"p_{output}"] >= 0.5 for i in keep], [preds[i][f"p_{output}"] for i in keep]
                )
            }
            if output == "harmful":
                results["response-judge, first window only"] = agreement(
                    y, [preds[i]["p_harmful_head"] >= 0.5 for i in keep], [preds[i]["p_harmful_head"] for i in keep]
                )
            for name, sc in scores.items():
                pr = [getattr(sc[i], output) if not sc[i].unparsed else None for i in keep]
                if any(v is not None for v in pr):  # refusal-keywords does not decide harm
                    results[name] = agreement(y, pr)
            for name, a in results.items():
                summary.setdefault(f"{source}/{output}", {})[name] = a.to_dict()
                rows.append(
                    [
                        source,
                        output,
                        name,
                        f"{a.n} ({a.positives} pos)",
                        a.accuracy.fmt(),
                        a.precision.fmt(),
                        a.recall.fmt(),
                        a.f1.fmt(False),
                        a.kappa.fmt(False),
                        a.ece.fmt(False),
                    ]
                )
        print(f"{source}: done", flush=True)

    speed_rows = []
    for name in (*OLD, "response-judge"):
        j = judges.get(name) or get_judge(name)
        speed_rows.append([name, f"{throughput(j, 256):.1f}", f"{throughput(j, 1024):.1f}"])

    header = ["source", "label", "judge", "n", "accuracy %", "precision %", "recall %", "F1", "kappa", "ECE"]
    lines = [
        f"Agreement with the labels of each held-out source (leave-one-source-out for response-judge; predictions "
        f"from `{args.loso}`, rows capped per source as recorded in its meta.json). 95% intervals: Wilson for "
        f"accuracy/precision/recall, bootstrap for F1/kappa/ECE. Load average at start: {load_avg}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Throughput (responses/s, one `score` call over 64 pairs after a warm-up; the response-judge reads a "
        "1,024-token response as 4 windows):",
        "",
        "| judge | 256 tokens | 1,024 tokens |",
        "|---|---:|---:|",
        *("| " + " | ".join(r) + " |" for r in speed_rows),
    ]
    table = "\n".join(lines)
    Console(width=220).print(Markdown(table))
    (args.loso / "benchmark.json").write_text(json.dumps({"agreement": summary, "speed": speed_rows}, indent=2))
    if args.no_write:
        return
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## Judges — {today} — {machine}\n\n{table}\n"
    path = ROOT / "BENCHMARKS.md"
    with path.open("a", encoding="utf-8") as fh:  # append only: other sections are never rewritten
        fh.write(section)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
