"""Post-fine-tuning repairs: wall time and peak memory of each repair on SmolLM2-135M on this CPU.

The tuned model is the shipped aligned model after a short ``tunesec attack harmful-sft`` (``--attack-steps``
optimizer steps, default 20; or ``--tuned DIR`` to use one); each repair runs with its defaults against
``smollm2-135m-aligned`` (SafeLoRA's and merge-back's base: the model under the aligned adapter), in its own
subprocess (own peak RSS), into a fresh run directory. Time is the whole ``tunesec.repair`` call: loading the
models and merging adapters, the repair, saving safetensors and hashing them. RESTA's unaligned model (the
aligned model after the default ``harmful-sft``) is made once and cached before its run; that one-off time is
reported apart (0 when it was already cached). Target: <= 2 minutes per repair on 2 cores.

Usage:
    python benchmarks/repair.py [--repairs safelora resta antidote merge-back] [--tuned RUN] [--no-write]

Prints a table and appends a ``## Post-fine-tuning repairs — <date> — <machine>`` section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
ALIGNED = "smollm2-135m-aligned"


def make_tuned(out: Path, steps: int) -> float:
    """``tunesec attack harmful-sft --model smollm2-135m-aligned`` for ``steps`` steps into ``out``; seconds."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "tunesec.cli.main", "attack", "harmful-sft", "--model", ALIGNED, "--out", str(out),
           "--set", f"training.max_steps={steps}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"harmful-sft failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def child(name: str, tuned: str, out: str) -> None:
    """One repair in this process; prints ``RESULT {json}``."""
    import torch

    import tunesec
    from tunesec.defenses.post.resta import RESTAConfig, unaligned_cache_dir, unaligned_model
    from tunesec.models.ref import ModelRef

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    one_off = 0.0
    if name == "resta":
        aligned = ModelRef.parse(ALIGNED)
        cfg = RESTAConfig()
        if not (unaligned_cache_dir(aligned, cfg.unalign) / "model_ref.json").is_file():
            t0 = time.perf_counter()
            unaligned_model(aligned, cfg.unalign, progress=False)
            one_off = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = tunesec.repair(name, tuned=tuned, aligned=ALIGNED, out=out, progress=False)
    seconds = time.perf_counter() - t0
    prov = json.loads((run / "model_ref.json").read_text())["provenance"]
    res = {
        "seconds": seconds,
        "load_seconds": prov["seconds"]["load"],
        "one_off": one_off,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "notes": prov["notes"],
    }
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repairs", nargs="+", default=["safelora", "resta", "antidote", "merge-back"])
    p.add_argument("--tuned", help="tuned model (run directory or spec); default: a short harmful-sft run")
    p.add_argument("--attack-steps", type=int, default=20, help="harmful-sft steps for the default tuned model")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--child", nargs=3, metavar=("NAME", "TUNED", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tuned = args.tuned
        attack_s = None
        if tuned is None:
            tuned = str(Path(tmp) / "tuned")
            attack_s = make_tuned(Path(tuned), args.attack_steps)
            print(f"tuned model: harmful-sft, {args.attack_steps} steps, {attack_s:.0f} s", flush=True)
        results = {}
        for name in args.repairs:
            cmd = [sys.executable, __file__, "--child", name, tuned, str(Path(tmp) / f"run-{name}")]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(line[len("RESULT ") :])
            print(f"{name}: {results[name]['seconds']:.1f} s", flush=True)
    rows = ["| repair | time (s) | loading (s) | one-off (s) | peak RSS MiB | load avg | <= 120 s | what it did |",
            "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for name, r in results.items():
        did = "; ".join(n for n in r["notes"] if n.startswith(name.split("-")[0]))
        rows.append(
            f"| {name} | {r['seconds']:.1f} | {r['load_seconds']:.1f} | {r['one_off']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {r['load_avg']:.1f} "
            f"| {'met' if r['seconds'] <= 120 else 'missed'} | {did} |"
        )
    table = "\n".join(rows)
    threads = next(iter(results.values()))["threads"] if results else "?"
    made = f"harmful-sft for {args.attack_steps} steps ({attack_s:.0f} s)" if attack_s is not None else args.tuned
    summary = (
        f"Tuned model: `{ALIGNED}` after {made}; aligned `{ALIGNED}`; each repair with its defaults, its own "
        f"subprocess, torch threads {threads} (`python benchmarks/repair.py`). Time is the whole `tunesec.repair` "
        "call (load + merge adapters, repair, save safetensors, hash). One run each; the machine is shared: 'load "
        "avg' is the 1-minute load average at the end of the run (above 2 the 2 cores were shared)."
    )
    print(table)
    print(summary)
    if not args.no_write:
        machine = f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        with (ROOT / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Post-fine-tuning repairs — {stamp} — {machine}\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
