"""Benchmark the CPU judges: throughput and agreement with labels on the harm classifier's held-out split.

The held-out split is rebuilt from ../shared/data by tunesec.judges.harm_data (the same recipe and split the
training script uses, so no test prompt was seen in training). Prints a markdown table and appends it, with the
date and machine, to BENCHMARKS.md at the repo root as a new "## Judges — <date> — <machine>" section.

Usage: .venv/bin/python benchmarks/judges.py [--data ../shared/data] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown

from tunesec.judges import DefaultJudge, HarmClassifier, Judge, JudgeInput, RefusalKeywords, Score
from tunesec.judges.classifier import LABELS, get_embedder
from tunesec.judges.harm_data import load_items

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def label_of(score: Score) -> str | None:
    """A judge's 3-class decision: harmful beats refusal beats benign; None when it cannot tell harm apart."""
    if score.unparsed:
        return None
    if score.harmful is None:
        return "refusal" if score.refused else None
    if score.harmful:
        return "harmful"
    return "refusal" if score.refused else "benign"


def rate(pred: list[bool], truth: list[bool]) -> tuple[float, float]:
    tp = sum(p and t for p, t in zip(pred, truth, strict=True))
    prec = tp / max(1, sum(pred))
    rec = tp / max(1, sum(truth))
    return prec, rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="test")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    load_avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    splits, _ = load_items(args.data)
    data = splits[args.split]
    items = [JudgeInput(prompt=i.prompt, response=i.response) for i in data]
    truth = [i.label for i in data]

    t0 = time.perf_counter()
    get_embedder()
    load_s = time.perf_counter() - t0
    classifier = HarmClassifier()
    keywords = RefusalKeywords()
    classifier.score(items[:32])  # warm-up (first-call allocations), not timed
    judges: list[tuple[str, Callable[[], Judge]]] = [
        ("refusal-keywords", lambda: keywords),
        ("harm-classifier", lambda: classifier),
        ("default (veto)", lambda: DefaultJudge(keywords=keywords, classifier=classifier)),
        ("default (veto=False)", lambda: DefaultJudge(veto=False, keywords=keywords, classifier=classifier)),
    ]
    rows = []
    for name, make in judges:
        judge = make()
        t, c = time.perf_counter(), time.process_time()
        scores = judge.score(items)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        labels = [label_of(s) for s in scores]
        ref_p, ref_r = rate([bool(s.refused) for s in scores], [t == "refusal" for t in truth])
        if all(lab is not None for lab in labels) and scores[0].harmful is not None:
            acc = sum(p == t for p, t in zip(labels, truth, strict=True)) / len(truth)
            recalls = {
                c: sum(p == t == c for p, t in zip(labels, truth, strict=True)) / max(1, truth.count(c)) for c in LABELS
            }
            harm_p, harm_r = rate([bool(s.harmful) for s in scores], [t == "harmful" for t in truth])
            row = [f"{acc:.3f}", *(f"{recalls[c]:.3f}" for c in LABELS), f"{harm_p:.3f}", f"{harm_r:.3f}"]
        else:
            row = ["n/a"] * 6  # keywords alone decide refusal only
        rows.append([name, f"{len(items) / secs:.0f}", f"{len(items) / cpu:.0f}", *row, f"{ref_p:.3f}", f"{ref_r:.3f}"])

    counts = ", ".join(f"{c} {truth.count(c)}" for c in LABELS)
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    header = [
        "judge",
        "responses/s",
        "responses/CPU-s",
        "accuracy (3-class)",
        "recall refusal",
        "recall harmful",
        "recall benign",
        "harmful precision",
        "harmful recall",
        "refused precision",
        "refused recall",
    ]
    lines = [
        f"Held-out `{args.split}` split of the harm-classifier data ({len(items)} pairs: {counts}); "
        f"split by prompt, built by `tunesec.judges.harm_data` from ../shared/data. Embedder load "
        f"{load_s:.1f}s (not in throughput). Throughput = whole split in one `score` call (wall clock); "
        f"responses/CPU-s divides by this process's CPU time (all threads), which other jobs on the machine do "
        f"not inflate. Load average at start: {load_avg}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    table = "\n".join(lines)
    Console(width=220).print(Markdown(table))
    if args.no_write:
        return
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## Judges — {today} — {machine}\n\n{table}\n"
    path = ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n", encoding="utf-8")
    with path.open("a", encoding="utf-8") as fh:  # append only: other sections are never rewritten
        fh.write(section)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
