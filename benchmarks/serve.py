"""Serving throughput and latency: N concurrent official-openai clients against `tunesec serve` on loopback.

Modes, each on the same prompts and the same loaded model, bounded by --requests and --duration:
  engine   the engine called directly with all requests at once (the ceiling: no HTTP, no queue);
  batched  the server with dynamic batching (--max-batch), no guards;
  single   the server decoding one request at a time (max_batch=1): what batching is compared with;
  guarded  the server with dynamic batching and the output guard (default judge) on every answer.
Reports requests/s, tokens/s, p50/p99 latency, 429s, other errors, and checks the audit log holds exactly one
line per request (none lost, none duplicated). Appends a table to BENCHMARKS.md unless --no-write.

    python benchmarks/serve.py --model smollm2-135m-aligned --clients 200 --duration 60 --requests 2000
    python benchmarks/serve.py --model DIR --clients 4 --duration 3 --requests 16 --no-write   # a quick check

The clients (AsyncOpenAI, one event loop) and the server (uvicorn in a thread) share this process, as a client
on the same host would share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def prompts(dataset: str, n: int) -> list[str]:
    from tunesec.data import resolve_dataset

    rows = resolve_dataset(dataset, limit=n)
    return [next(m.content for m in ex.messages if m.role == "user") for ex in rows]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def engine_direct(engine: Any, texts: list[str], max_tokens: int) -> dict[str, Any]:
    from tunesec.models.types import GenerationConfig

    t0 = time.perf_counter()
    gens = engine.generate(texts, GenerationConfig(max_new_tokens=max_tokens), progress=False)
    secs = time.perf_counter() - t0
    toks = sum(g.completion_tokens for g in gens)
    return {"ok": len(gens), "seconds": secs, "tokens": toks, "lat": [secs] * len(gens), "r429": 0, "errors": 0}


async def clients_run(url: str, key: str, model: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import openai

    # A request may wait behind every other client's (the single mode: 200 x a few seconds), so the client
    # timeout is well above that; the run is bounded by --duration and the drain of what is in flight.
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=args.clients), timeout=3600)
    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, http_client=http)
    next_i = 0
    lat: list[float] = []
    out = {"ok": 0, "tokens": 0, "r429": 0, "errors": 0, "error_kinds": {}, "blocked": 0}
    deadline = time.perf_counter() + args.duration

    async def one_client() -> None:
        nonlocal next_i
        while time.perf_counter() < deadline and next_i < args.requests:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": texts[i % len(texts)]}],
                    max_tokens=args.max_tokens, temperature=0,
                )  # fmt: skip
                lat.append(time.perf_counter() - t0)
                out["ok"] += 1
                out["tokens"] += r.usage.completion_tokens if r.usage else 0
                out["blocked"] += r.choices[0].finish_reason == "content_filter"
            except openai.RateLimitError:
                out["r429"] += 1
            except Exception as err:
                out["errors"] += 1
                kinds = out["error_kinds"]
                kinds[type(err).__name__] = kinds.get(type(err).__name__, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(args.clients)))
    out["seconds"] = time.perf_counter() - t0
    out["lat"] = lat
    await http.aclose()
    return out


def served(engine: Any, texts: list[str], args: argparse.Namespace, max_batch: int, guard: bool) -> dict[str, Any]:

    from tunesec.serve.auth import KeyStore
    from tunesec.serve.batching import BatchingBackend
    from tunesec.serve.config import load_serve_config
    from tunesec.serve.server import build_state

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "serve.yaml"
        cfg_path.write_text(
            "auth: {keys_file: keys.json, rate_limit: {requests_per_minute: 1000000, burst: 100000}}\n"
            f"audit: {{path: audit.jsonl}}\nguards: {{output: {{enabled: {str(guard).lower()}}}}}\n"
            f"limits: {{max_tokens: {max(args.max_tokens, 256)}}}\n",
            encoding="utf-8",
        )
        cfg = load_serve_config(cfg_path)
        _, key = KeyStore(cfg.auth.keys_file).add("bench")  # type: ignore[arg-type]
        backend = BatchingBackend(engine, max_batch, args.max_wait_ms, "bench")
        state = build_state("bench", cfg, "127.0.0.1", backend=backend)
        try:
            with running(state) as sock_port:
                res = asyncio.run(clients_run(f"http://127.0.0.1:{sock_port}/v1", key, "bench", texts, args))
        finally:
            asyncio.run(backend.close())
            state.audit.close()
        lines = [json.loads(x) for x in cfg.audit.path.read_text(encoding="utf-8").splitlines()]  # type: ignore[union-attr]
        res["audit_lines"] = len(lines)
        res["audit_unique"] = len({ln["id"] for ln in lines})
        res["mean_batch"] = statistics.mean(backend.batches) if backend.batches else 0.0
        return res


@contextmanager
def running(state: Any) -> Iterator[int]:
    """Serve ``state`` (a ``ServeState``) with uvicorn in a thread on a free loopback port; yields the port."""
    import uvicorn

    from tunesec.serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-aligned")
    ap.add_argument("--dataset", default="tunesec-everyday")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=2000, help="Most requests per mode.")
    ap.add_argument("--duration", type=float, default=60.0, help="Most seconds of client traffic per mode.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--modes", nargs="+", default=["engine", "batched", "single", "guarded"])
    ap.add_argument("--no-write", action="store_true", help="Do not append to BENCHMARKS.md.")
    args = ap.parse_args()

    from tunesec.models import get_generator

    engine = get_generator(args.model, backend="hf")
    texts = prompts(args.dataset, min(args.requests, 360))
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        if mode == "engine":
            results[mode] = engine_direct(
                engine, [texts[i % len(texts)] for i in range(args.requests)], args.max_tokens
            )
        elif mode in ("batched", "single", "guarded"):
            mb = 1 if mode == "single" else args.max_batch
            results[mode] = served(engine, texts, args, mb, guard=mode == "guarded")
        else:
            raise SystemExit(f"unknown mode {mode}")
        r = results[mode]
        print(f"{mode}: {r['ok']} ok in {r['seconds']:.1f} s, {r['ok'] / r['seconds']:.2f} req/s", flush=True)

    head = "| mode | ok | blocked | 429 | errors | req/s | tokens/s | p50 s | p99 s | mean batch | audit lines (uniq) |"
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        audit = f"{r['audit_lines']} ({r['audit_unique']})" if "audit_lines" in r else "-"
        errs = f"{r['errors']} {r.get('error_kinds') or ''}".strip()
        batch = f"{r['mean_batch']:.2f}" if "mean_batch" in r else "-"
        rows.append(
            f"| {mode} | {r['ok']} | {r.get('blocked', 0)} | {r['r429']} | {errs} | {r['ok'] / r['seconds']:.2f} | "
            f"{r['tokens'] / r['seconds']:.1f} | {percentile(r['lat'], 0.5):.2f} | {percentile(r['lat'], 0.99):.2f} | "
            f"{batch} | {audit} |"
        )
    if "batched" in results and "single" in results:
        b, s = results["batched"], results["single"]
        rows.append(f"\nbatched / single throughput: {(b['ok'] / b['seconds']) / (s['ok'] / s['seconds']):.2f}x")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        import torch

        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        bench = ROOT / "BENCHMARKS.md"
        with open(bench, "a", encoding="utf-8") as fh:
            fh.write(f"\n## Serving — {stamp} — {machine}\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
        print(f"appended to {bench}")


if __name__ == "__main__":
    main()
