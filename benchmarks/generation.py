"""Generation throughput: the batched engine vs the one-prompt-at-a-time HF loop research repos use.

Same model, same 64 prompts, greedy, same max_new_tokens. Reports tokens/s of each, the speed-up, how many
outputs are identical, and the machine's measured fp32 matmul GFLOP/s, which gives a compute bound of
GFLOP/s / (2 x parameters) tokens/s. Prints a table and appends it to BENCHMARKS.md with the date and machine.

    python benchmarks/generation.py [--model smollm2-135m] [--n 64] [--max-new-tokens 64] [--kernels-ab 3]

``--kernels-ab K`` adds K alternating rounds of the engine with and without its CPU decoding kernels
(tunesec.models.cpu_kernels) on the same prompts, in the same process: the machine's speed drifts between runs, so
only alternating runs on one loaded model compare fairly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import tunesec.models.generation as generation
from tunesec.models import GenerationConfig, load_model
from tunesec.models.chat import ChatFormatter
from tunesec.models.generation import HFGenerator

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def prompts(n: int) -> list[str]:
    """A mix of benign (Alpaca) and harmful (AdvBench) requests of varied length, as an evaluation sees."""
    import csv
    import json

    out: list[str] = []
    alpaca = DATA / "alpaca" / "alpaca_200.json"
    adv = DATA / "advbench" / "harmful_behaviors.csv"
    if alpaca.is_file() and adv.is_file():
        rows = json.loads(alpaca.read_text())
        with open(adv, newline="") as fh:
            goals = [r["goal"] for r in csv.DictReader(fh)]
        for i in range(n):
            if i % 2 == 0:
                r = rows[i]
                out.append(r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))
            else:
                out.append(goals[i])
        return out
    return [f"Write a short note number {i} about {w}." for i, w in enumerate(["cats", "rain", "tea", "maps"] * n)][:n]


def matmul_gflops(size: int = 1024, reps: int = 30) -> dict[str, float]:
    """Measured fp32 matmul rate of this machine (best of three timings), with MKL and with oneDNN.

    torch's CPU matmul runs on MKL; oneDNN (the engine's kernels for linear layers) is much faster on some CPUs
    (on this AMD machine ~450 vs ~220 GFLOP/s). The compute bound uses the faster of the two.
    """
    from tunesec.models.cpu_kernels import pointwise_linear_op

    a, b = torch.randn(size, size), torch.randn(size, size)
    runs = {"MKL": lambda: a @ b}
    op = pointwise_linear_op() if torch.backends.mkldnn.is_available() else None
    if op is not None:
        packed = b.t().contiguous().to_mkldnn()
        runs["oneDNN"] = lambda: op(a, packed, None, "none", [], "")
    rates = {}
    for name, run in runs.items():
        for _ in range(3):
            run()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                run()
            best = min(best, time.perf_counter() - t)
        rates[name] = 2 * size**3 * reps / best / 1e9
    return rates


def hf_loop(lm, texts: list[str], max_new: int) -> tuple[list[str], int, float]:
    """The common research loop: one prompt at a time through model.generate."""
    fmt = ChatFormatter(lm.tokenizer)
    outs, tokens = [], 0
    t = time.perf_counter()
    with torch.inference_mode():
        for p in texts:
            ids = torch.tensor([fmt.encode([{"role": "user", "content": p}])])
            gen = lm.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
            new = gen[0, ids.shape[1] :].tolist()
            tokens += len(new)
            outs.append(lm.tokenizer.decode(new, skip_special_tokens=True))
    return outs, tokens, time.perf_counter() - t


def kernels_ab(engine: HFGenerator, texts: list[str], cfg: GenerationConfig, rounds: int) -> list[tuple[str, str]]:
    """Alternating runs of the engine with and without its CPU decoding kernels; median tok/s of each."""
    real = generation.cpu_inference
    rates: dict[str, list[float]] = {"on": [], "off": []}
    outs: dict[str, list[str]] = {}
    try:
        for _ in range(rounds):
            for mode in ("off", "on"):
                generation.cpu_inference = real if mode == "on" else (lambda model: contextlib.nullcontext())
                t = time.perf_counter()
                gens = engine.generate(texts, cfg, progress=False)
                rates[mode].append(sum(g.completion_tokens for g in gens) / (time.perf_counter() - t))
                outs[mode] = [g.text for g in gens]
    finally:
        generation.cpu_inference = real
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    same = sum(a == b for a, b in zip(outs["on"], outs["off"], strict=True))
    runs = ", ".join(f"{r:.0f}" for r in rates["on"]) + " vs " + ", ".join(f"{r:.0f}" for r in rates["off"])
    return [
        (f"CPU kernels on / off, {rounds} alternating rounds", f"{on:.1f} / {off:.1f} tok/s (median; {runs})"),
        ("kernels speed-up, identical outputs", f"{on / off:.2f}x, {same} / {len(texts)}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--kernels-ab", type=int, default=0, metavar="K", help="Rounds of kernels on/off A/B.")
    ap.add_argument("--no-write", action="store_true", help="Do not append to BENCHMARKS.md.")
    args = ap.parse_args()

    lm = load_model(args.model)
    n_params = sum(p.numel() for p in lm.model.parameters())
    texts = prompts(args.n)
    probe = matmul_gflops()
    gflops = max(probe.values())
    bound = gflops * 1e9 / (2 * n_params)

    engine = HFGenerator(lm)
    bs = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=bs)
    engine.generate(texts[:2], cfg.model_copy(update={"max_new_tokens": 4}), progress=False)  # warm-up
    t = time.perf_counter()
    gens = engine.generate(texts, cfg, progress=False)
    eng_s = time.perf_counter() - t
    # count generated tokens as the loop does (EOS included) for a like-for-like rate
    eng_tokens = sum(g.completion_tokens for g in gens)

    loop_texts, loop_tokens, loop_s = hf_loop(lm, texts, args.max_new_tokens)
    identical = sum(a == b.text for a, b in zip(loop_texts, gens, strict=True))

    eng_rate, loop_rate = eng_tokens / eng_s, loop_tokens / loop_s
    rows = [
        ("model", f"{args.model} ({n_params / 1e6:.1f}M params)"),
        ("prompts x max_new_tokens", f"{args.n} x {args.max_new_tokens} (greedy)"),
        ("HF loop, one prompt at a time", f"{loop_rate:.1f} tok/s ({loop_tokens} tok in {loop_s:.1f} s)"),
        (
            "tunesec engine (batch " + str(args.batch_size) + ")",
            f"{eng_rate:.1f} tok/s ({eng_tokens} tok in {eng_s:.1f} s)",
        ),
        ("speed-up", f"{eng_rate / loop_rate:.1f}x (target >= 10x)"),
        ("identical outputs", f"{identical} / {args.n}"),
        ("fp32 matmul 1024^3", ", ".join(f"{k} {v:.0f}" for k, v in probe.items()) + " GFLOP/s"),
        ("compute bound (best GFLOP/s / 2N)", f"{bound:.0f} tok/s"),
        ("engine / compute bound", f"{100 * eng_rate / bound:.0f}% (target >= 60%)"),
    ]
    if args.kernels_ab:
        rows += kernels_ab(engine, texts, cfg, args.kernels_ab)
    width = max(len(k) for k, _ in rows)
    table = "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    if not args.no_write:
        threads = torch.get_num_threads()
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"
        bench = ROOT / "BENCHMARKS.md"
        head = (
            ""
            if bench.exists()
            else "# Benchmarks\n\nMeasured by the scripts in benchmarks/; each run appends a section.\n"
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with open(bench, "a", encoding="utf-8") as fh:
            fh.write(f"{head}\n## Generation — {stamp} — {machine}\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
        print(f"appended to {bench}")


if __name__ == "__main__":
    main()
