"""Re-judge finished evaluation runs with other judges and print their metrics side by side (markdown).

The responses are read from each run's ``records.jsonl`` (nothing is generated again); each judge scores every
(prompt, response) the same way the task did, and the task recomputes its metrics from the re-judged records.
For prefilling runs the judge reads the model's continuation, as in the run itself.

    python scripts/rejudge.py runs/A runs/B --judges keywords-embedding,default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunesec.evals.tasks import get_task
from tunesec.judges import JudgeInput, get_judge, score_cached


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--judges", default="keywords-embedding,default")
    ap.add_argument("--metrics", default="harmful_rate,refusal_rate")
    ap.add_argument("--json", type=Path, default=None, help="also write every value and interval here")
    args = ap.parse_args()
    judges = [j for j in args.judges.split(",") if j]
    metrics = [m for m in args.metrics.split(",") if m]
    header = ["run", "dataset", "n"] + [f"{m} ({j})" for m in metrics for j in judges]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    dump = {}
    for run in args.runs:
        spec = json.loads((run / "run.json").read_text(encoding="utf-8"))["spec"]
        task = get_task(spec["task"]["name"], **{k: v for k, v in spec["task"].items() if k != "name"})
        records = [json.loads(line) for line in (run / "records.jsonl").read_text(encoding="utf-8").splitlines()]
        items = [JudgeInput(prompt=r["prompt"], response=r["response"], id=r["id"]) for r in records]
        cells = {}
        for name in judges:
            scores = score_cached(get_judge(name), items)
            rejudged = [{**r, **task.judgement(s, r["response"])} for r, s in zip(records, scores, strict=True)]
            values = task.metrics(rejudged)
            for m in metrics:
                v = values.get(m)
                if v is None:
                    cells[(m, name)] = "–"
                    continue
                cells[(m, name)] = f"{100 * v.value:.0f}% [{100 * v.ci_low:.0f}, {100 * v.ci_high:.0f}]"
                dump.setdefault(str(run), {})[f"{m}/{name}"] = v.model_dump()
        row = [run.name, str(spec.get("dataset", {}).get("name", "")), str(len(records))]
        row += [cells[(m, j)] for m in metrics for j in judges]
        print("| " + " | ".join(row) + " |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
