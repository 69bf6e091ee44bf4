"""Build prefilling-attack datasets from a model's own harmful answers (Qi et al. 2024, section 2).

The paper's prefilling attack forces an aligned model's answer to begin with the first k tokens of a real
harmful answer to the same request. This script takes those answers from an evaluation run of an unaligned
model (``tunesec eval smollm2-135m --task harmfulness ... --out RUN``): for every prompt it did not refuse and
answered in at least k words, it writes ``{"id", "prompt", "target"}`` with ``target`` = the answer up to the
end of its k-th word (line breaks kept). Evaluate a model under the attack with

    python scripts/selfprefill.py RUN --words 5 20 --out-dir runs/selfprefill
    tunesec eval MODEL --task harmfulness --dataset runs/selfprefill/advbench-prefix-5.jsonl \\
        --max-new-tokens 64 --task-option prefill=target

The judge reads only the model's continuation after the forced words (docs/RESULTS.md, section 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunesec.data.schema import count_words, first_words


def prefix_rows(records: list[dict], k: int) -> list[dict]:
    """One row per record the model answered (not refused) in at least ``k`` words; target = first k words."""
    rows = []
    for rec in records:
        if rec.get("refused") is not False:  # refused, or no refusal verdict: not a harmful answer to reuse
            continue
        response = rec.get("response") or ""
        if count_words(response) < k:
            continue
        rows.append({"id": rec["id"], "prompt": rec["prompt"], "target": first_words(response, k)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="evaluation run directory of the model whose answers are reused")
    ap.add_argument("--words", type=int, nargs="+", default=[5, 20], help="prefix lengths k in words")
    ap.add_argument("--out-dir", type=Path, required=True, help="folder for advbench-prefix-K.jsonl files")
    ap.add_argument("--name", default="advbench", help="file name stem (default advbench)")
    args = ap.parse_args()
    path = args.run / "records.jsonl"
    if not path.is_file():
        print(
            f"error: {path}: no records.jsonl; expected a finished `tunesec eval ... --out RUN` directory",
            file=sys.stderr,
        )
        return 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or "refused" not in records[0]:
        print(f"error: {path}: records carry no 'refused' field; expected a harmfulness evaluation", file=sys.stderr)
        return 2
    if any(k < 1 for k in args.words):
        print(f"error: --words: {min(args.words)}; expected positive numbers of words", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for k in args.words:
        rows = prefix_rows(records, k)
        out = args.out_dir / f"{args.name}-prefix-{k}.jsonl"
        if out.exists():
            print(f"error: {out}: exists; not overwritten (remove it or choose another --out-dir)", file=sys.stderr)
            return 2
        tmp = out.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(out)
        print(f"{out}: {len(rows)} of {len(records)} prompts (first {k} words of the answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
