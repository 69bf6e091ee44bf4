"""What the output guard of `tunesec serve` stops, and what it costs, on an attacked model.

The model is served on loopback behind the default controls (output guard = the `default` judge) with
`audit.raw_text: true`, so the audit log keeps, for each blocked request, the answer the guard withheld.
`tunesec.evaluate` then runs against the server as a black-box `openai:` model, exactly as a certifier would:

  harmful   AdvBench (520) and JBB-harmful (100): harmful rate of the returned text;
  benign    XSTest-safe (250) and JBB-benign (100): refusal rate of the returned text (over-refusal).

Counted by a judge other than the guard (default `keywords-embedding`; the same judge guarding and counting
would be circular). The same requests without the guard are the same answers with the withheld ones put back
(greedy decoding, one model: the guard changes nothing else), so both columns come from one generation pass
and are paired. Appends a table to BENCHMARKS.md and writes every evaluation run under --out.

    python benchmarks/serve_guard.py --model ~/.cache/tunesec/matrix/attacks/<harmful-sft run>/model_ref.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import running  # noqa: E402  (the loopback server of benchmarks/serve.py)

SETS = [("harmfulness", "advbench", {}), ("harmfulness", "jbb-harmful", {}),
        ("over-refusal", "xstest", {"subset": "safe"}), ("over-refusal", "jbb-benign", {})]  # fmt: skip


def _withheld(audit: Path) -> dict[str, list[str]]:
    """Prompt -> answers the guard withheld (in request order)."""
    out: dict[str, list[str]] = {}
    for line in audit.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("withheld") is not None:
            out.setdefault(rec["prompt"], []).append(rec["withheld"])
    return out


def _guard_scores(audit: Path) -> dict[str, float]:
    """Prompt -> the output guard's P(harmful) on its answer (requests the guard saw)."""
    out: dict[str, float] = {}
    for line in audit.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        score = (rec.get("scores") or {}).get("output")
        if score is not None:
            out[rec["prompt"]] = float(score)
    return out


def replay(out: Path, threshold: float, counter_name: str, wilson: Any) -> list[dict[str, Any]]:
    """The sets of a finished run with the guard blocking at ``threshold`` instead: the same answers (greedy,
    one model: the guard changes nothing before it), blocked where the guard's recorded score reaches it."""
    from tunesec.judges import get_judge
    from tunesec.judges.base import JudgeInput

    counter = get_judge(counter_name)
    withheld, scores = _withheld(out / "audit.jsonl"), _guard_scores(out / "audit.jsonl")
    rows = []
    for task, dataset, _ in SETS:
        records = [json.loads(x) for x in (out / dataset / "records.jsonl").read_text().splitlines()]
        raw = [(withheld.get(r["prompt"]) or [r["response"]])[0] for r in records]
        judged = counter.score([JudgeInput(prompt=r["prompt"], response=t) for r, t in zip(records, raw, strict=True)])
        field = "harmful" if task == "harmfulness" else "refused"
        block = [scores.get(r["prompt"], 0.0) >= threshold for r in records]
        off = sum(bool(getattr(j, field)) for j in judged)
        if field == "harmful":
            on = sum(bool(j.harmful) and not b for j, b in zip(judged, block, strict=True))
        else:
            on = sum(bool(j.refused) or b for j, b in zip(judged, block, strict=True))
        rows.append({"set": dataset, "metric": f"{field} rate", "n": len(records), "blocked": sum(block),
                     "on": on, "off": off, "seconds": 0.0, "run": str(out / dataset)})  # fmt: skip
        print(_fmt(rows[-1], wilson))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Model spec (a tuned model's model_ref.json, directory, alias).")
    ap.add_argument("--counter", default="keywords-embedding", help="Judge that counts (not the guard's).")
    ap.add_argument("--guard-judge", default="default")
    ap.add_argument(
        "--guard-threshold", type=float, default=None,
        help="Block at this P(harmful) of the guard judge (default: the judge's own decision).",
    )  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="Seeded sample per set (default: all).")
    ap.add_argument("--out", default=None, help="Directory for the evaluation runs (default runs/serve-guard-<UTC>).")
    ap.add_argument("--no-write", action="store_true", help="Do not append to BENCHMARKS.md.")
    ap.add_argument("--sets", nargs="+", default=[d for _, d, _ in SETS], choices=[d for _, d, _ in SETS])
    ap.add_argument(
        "--replay", type=float, default=None, metavar="T",
        help="Serve nothing: recount the finished run in --out as if the guard blocked at P(harmful) >= T.",
    )  # fmt: skip
    args = ap.parse_args()
    if args.replay is not None:
        from tunesec.evals.metrics import wilson_interval

        if not args.out or not (Path(args.out) / "audit.jsonl").is_file():
            sys.exit("--replay: --out must be a finished serve_guard run (with audit.jsonl)")
        args.guard_threshold = args.replay
        rows = replay(Path(args.out).resolve(), args.replay, args.counter, wilson_interval)
        table = (
            _table(rows, args, wilson_interval)
            .replace("guard on |", f"guard on (replayed at {args.replay}) |")
            .replace("| seconds |", "| - |")
        )
        print(table)
        if not args.no_write:
            with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
                fh.write(table)
        return 0

    from tunesec import evaluate
    from tunesec.evals.metrics import wilson_interval
    from tunesec.evals.runner import EvalReport
    from tunesec.judges import get_judge
    from tunesec.judges.base import JudgeInput
    from tunesec.models.endpoint import OpenAIChatGenerator
    from tunesec.models.ref import ModelRef
    from tunesec.serve.auth import KeyStore
    from tunesec.serve.config import load_serve_config
    from tunesec.serve.server import build_state

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or ROOT / "runs" / f"serve-guard-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)  # an existing --out resumes: finished sets are kept
    tmp = Path(tempfile.mkdtemp(prefix="serve-guard-"))
    cfg_path = tmp / "serve.yaml"
    threshold = "null" if args.guard_threshold is None else args.guard_threshold
    cfg_path.write_text(
        "served_name: attacked\n"
        "auth: {keys_file: keys.json, rate_limit: {requests_per_minute: 1000000, burst: 100000}}\n"
        f"audit: {{path: {out / 'audit.jsonl'}, raw_text: true}}\n"
        f"guards: {{output: {{enabled: true, judge: {args.guard_judge}, threshold: {threshold}}}, timeout_s: 60}}\n"
        f"limits: {{max_tokens: {max(args.max_tokens, 256)}}}\n",
        encoding="utf-8",
    )
    cfg = load_serve_config(cfg_path)
    _, key = KeyStore(cfg.auth.keys_file).add("serve-guard")  # type: ignore[arg-type]
    t_load = time.perf_counter()
    state = build_state(args.model, cfg, "127.0.0.1")
    stack = ExitStack()  # the server runs until the finally below
    port = stack.enter_context(running(state))
    print(f"served {args.model} as 'attacked' on port {port} (loaded in {time.perf_counter() - t_load:.0f} s)")
    os.environ["SERVE_GUARD_KEY"] = key
    ref = ModelRef.parse(f"openai:attacked@http://127.0.0.1:{port}/v1")
    ref = ref.model_copy(update={"api_key_env": "SERVE_GUARD_KEY"})
    gen = OpenAIChatGenerator(ref, concurrency=args.concurrency, timeout=600.0)
    counter = get_judge(args.counter)
    rows: list[dict[str, Any]] = []
    try:
        for task, dataset, options in SETS:
            if dataset not in args.sets:
                continue
            t0 = time.perf_counter()
            run = out / dataset
            if (run / "metrics.json").is_file():  # finished in an earlier call
                rep = EvalReport.load(run)
            else:
                where = {"resume": run} if (run / "run.json").is_file() else {"out": run}
                rep = evaluate(
                    f"openai:attacked@http://127.0.0.1:{port}/v1", task, dataset, judge=counter, generator=gen,
                    dataset_options=options or None, limit=args.limit, generation={"max_new_tokens": args.max_tokens},
                    html=False, **where,
                )  # fmt: skip
            secs = rep.timing.get("wall_s", time.perf_counter() - t0)
            records = [json.loads(x) for x in (out / dataset / "records.jsonl").read_text().splitlines()]
            withheld = _withheld(out / "audit.jsonl")
            raw = [(withheld.get(r["prompt"]) or [r["response"]])[0] for r in records]
            blocked = sum(r["prompt"] in withheld for r in records)
            scores = counter.score(
                [JudgeInput(prompt=r["prompt"], response=t) for r, t in zip(records, raw, strict=True)]
            )
            field = "harmful" if task == "harmfulness" else "refused"
            k_on = sum(bool(r[field]) for r in records)
            k_off = sum(bool(getattr(s, field)) for s in scores)
            n = len(records)
            rows.append({"set": dataset, "metric": f"{field} rate", "n": n, "blocked": blocked,
                         "on": k_on, "off": k_off, "seconds": secs, "run": str(out / dataset),
                         "headline": rep.headline.value if rep.headline else None})  # fmt: skip
            print(_fmt(rows[-1], wilson_interval))
    finally:
        stack.close()
        state.audit.close()
    table = _table(rows, args, wilson_interval)
    print(table)
    (out / "summary.json").write_text(json.dumps({"model": args.model, "rows": rows, "args": vars(args)}, indent=1))
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
            fh.write(table)
    return 0


def _fmt(r: dict[str, Any], wilson: Any) -> str:
    def pct(k: int) -> str:
        lo, hi = wilson(k, r["n"])
        return f"{100 * k / r['n']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    return (f"| {r['set']} | {r['metric']} | {r['n']} | {pct(r['off'])} | {pct(r['on'])} | {r['blocked']} "
            f"| {r['seconds']:.0f} |")  # fmt: skip


def _table(rows: list[dict[str, Any]], args: argparse.Namespace, wilson: Any) -> str:
    import torch

    head = (
        f"\n## serve_guard: output guard of `tunesec serve` on an attacked model "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python "
        f"{platform.python_version()}. Model `{args.model}` served on loopback, output guard judge "
        f"`{args.guard_judge}` (threshold {args.guard_threshold or 'the judge decision'}), "
        f"counted by `{args.counter}` on the returned text; greedy, {args.max_tokens} new "
        f"tokens, {args.concurrency} requests in flight. 'guard off' = the same answers with what the guard "
        f"withheld put back (from the raw-text audit log). 95% Wilson intervals.\n\n"
        "| set | metric | n | guard off | guard on | blocked | seconds |\n|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(_fmt(r, wilson) for r in rows) + f"\n\nCommand: `{' '.join(sys.argv)}`\n"


if __name__ == "__main__":
    sys.exit(main())
