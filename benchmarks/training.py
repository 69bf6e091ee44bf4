"""Training throughput: the tunesec engine vs TRL's SFTTrainer on the same model, data, LoRA and steps.

Both train LoRA (r=8, alpha=16, all attention + MLP projections) with batch size 8 on the same Alpaca
examples (chat-formatted, ~110 tokens each, loss on the answer only), fp32, no gradient checkpointing, no bf16.
The engine also runs without its CPU kernels (tunesec.models.cpu_kernels.cpu_training: oneDNN for the frozen
linear layers, per-example attention over packed rows), to show what they add. Each run is its own subprocess,
so the peak RSS is its own; ``--rounds R`` repeats the two engine runs R times, alternating, and reports medians
(the machine's speed drifts between runs). Tokens/s counts real (non-pad) tokens of
the examples trained on, over the time of the training loop (dataset preparation excluded for both).

Usage:
    python benchmarks/training.py [--model smollm2-135m] [--steps 20] [--batch-size 8] [--rounds 1] [--no-write]
    python benchmarks/training.py --defense vaccine t-vaccine booster vaa ctrap [--steps 10]
    python benchmarks/training.py --defense repnoise seam tar unlearn-smooth

Prints a table and appends a ``## Training — <date> — <machine>`` section to BENCHMARKS.md.

``--defense`` measures what each alignment-stage defense's hooks cost per optimizer step against a plain step of
the same engine on the same data (each run its own subprocess; defaults of each defense; harmful pairs from
its default harmful data; VAA's two groups are the data split in half, since the sampler's cost does not depend
on which examples are vulnerable, and its SAM probability is forced to 1 so that every step pays for it). The
forward-backward count is what the method needs per step (Vaccine and T-Vaccine: 2, their first pass only to the
activations; Booster and CTRAP: 3; VAA: 2 with SAM); the target is cost <= 1.2 x count x plain step. Appends a
``## Defense cost per step`` section.
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
DATA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_1k.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_examples(tokenizer, n: int, lo: int, hi: int):
    """Alpaca records as chats whose rendered length is in [lo, hi] tokens, cycled to ``n``."""
    from tunesec.data.schema import Example, Message
    from tunesec.training.collate import chat_renderer, encode_example

    if not DATA.is_file():
        sys.exit(f"{DATA}: benchmark data not found (expected ../shared/data from the repo root)")
    render = chat_renderer(tokenizer)
    picked = []
    for i, rec in enumerate(json.loads(DATA.read_text())):
        user = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "")
        ex = Example(
            id=f"alpaca-{i}",
            messages=[Message(role="user", content=user), Message(role="assistant", content=rec["output"])],
        )
        if lo <= len(encode_example(ex, tokenizer, render, 4096).input_ids) <= hi:
            picked.append(ex)
    if not picked:
        sys.exit(f"no Alpaca example has {lo}-{hi} tokens")
    out = [picked[i % len(picked)].model_copy(update={"id": f"{picked[i % len(picked)].id}-{i}"}) for i in range(n)]
    return out


def run_engine(model_spec: str, steps: int, batch: int, lo: int, hi: int, kernels: bool = True) -> dict:
    import contextlib

    import tunesec.training.engine as engine
    from tunesec.models import load_model
    from tunesec.training import TrainConfig, train

    if not kernels:
        engine.cpu_training = lambda model, **kwargs: contextlib.nullcontext()

    loaded = load_model(model_spec, device="cpu")
    data = load_examples(loaded.tokenizer, steps * batch, lo, hi)
    cfg = TrainConfig(
        method="lora",
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=TARGETS,
        per_device_batch_size=batch,
        max_steps=steps,
        learning_rate=2e-4,
        save_steps=0,
        max_seq_len=512,
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = train(loaded, data, cfg, out_dir=tmp, progress=False)
    m = res.metrics
    return {"tokens": m.tokens, "seconds": m.seconds, "loss_first": m.losses[0], "loss_last": m.losses[-1]}


def run_sft(model_spec: str, steps: int, batch: int, lo: int, hi: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesec.models import load_model

    loaded = load_model(model_spec, device="cpu")
    data = load_examples(loaded.tokenizer, steps * batch, lo, hi)
    rows = [{"prompt": ex.prompt_chat(), "completion": [ex.chat()[-1]]} for ex in data]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=2e-4,
            bf16=False,
            gradient_checkpointing=False,
            completion_only_loss=True,
            max_length=512,
            packing=False,
            report_to="none",
            save_strategy="no",
            logging_steps=steps,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=42,
            use_cpu=True,
        )
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(
            model=loaded.model,
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            processing_class=loaded.tokenizer,
            peft_config=lora,
            callbacks=[clock],
        )
        tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset)
        out = trainer.train()
    return {"tokens": tokens, "seconds": clock.seconds, "loss_last": float(out.training_loss)}


# forward-backward passes per step that each defense's method needs (see the module docstring)
FB_COUNT = {
    "none": 1,
    "vaccine": 2,
    "t-vaccine": 2,
    "booster": 3,
    "ctrap": 3,
    "vaa": 2,
    "repnoise": 2,  # the harmful forward-backward adds the logit lens of every layer on 64 tokens
    "seam": 6,
    "unlearn-smooth": 3,  # plus the reference model's forward pass
    "tar": 4,  # K=2 inner steps + 1 meta-gradient + the training pass (+ the start model's forward pass)
}


def run_defense(name: str, model_spec: str, steps: int, batch: int, lo: int, hi: int) -> dict:
    """``steps`` steps of the engine with defense ``name``'s hooks (``none``: no hooks) on the benchmark data."""
    from tunesec.defenses import get_defense
    from tunesec.defenses.alignment.vaa import OTHER, VULNERABLE
    from tunesec.defenses.base import HarmfulDataConfig, defense_harmful_data
    from tunesec.models import load_model
    from tunesec.training import TrainConfig, train

    loaded = load_model(model_spec, device="cpu")
    data = load_examples(loaded.tokenizer, steps * batch, lo, hi)
    cfg = TrainConfig(
        method="lora", lora_r=8, lora_alpha=16, lora_target_modules=TARGETS, per_device_batch_size=batch,
        max_steps=steps, learning_rate=2e-4, save_steps=0, max_seq_len=512,
    )  # fmt: skip
    hooks, extra = [], {}
    if name != "none":
        defense = get_defense(name, {"lam": 1.0} if name == "vaa" else None)
        harmful, _ = defense_harmful_data(HarmfulDataConfig(n=200), defense=name)
        hooks = defense.hooks(harmful, data)
        extra = {
            "harmful": harmful[:100],
            "harmful-heldout": harmful[100:],
            "benign": data,
            VULNERABLE: data[::2],
            OTHER: data[1::2],
        }
        if name == "vaa":
            hooks[0].lam = float("inf")  # SAM on every step (the schedule's probability is lam * progress)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(loaded, data, cfg, out_dir=tmp, hooks=hooks, extra_datasets=extra, progress=False)
    m = res.metrics
    return {"tokens": m.tokens, "seconds": m.seconds, "steps": m.steps, "loss_last": m.losses[-1]}


def defense_costs(args: argparse.Namespace) -> None:
    """Run ``none`` and every ``--defense`` in its own subprocess; print and append the cost table."""
    results = {}
    for name in ["none", *args.defense]:
        cmd = [sys.executable, __file__, "--child", f"defense:{name}", "--model", args.model, "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--min-tokens", str(args.min_tokens),
               "--max-tokens", str(args.max_tokens)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT ") :])
        print(f"{name}: {results[name]['seconds'] / results[name]['steps']:.2f} s/step", flush=True)
    plain = results["none"]["seconds"] / results["none"]["steps"]
    rows = ["| defense | F/B per step | s/step | x plain step | x (F/B count x plain) | peak RSS MiB | target <= 1.2 |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        per = r["seconds"] / r["steps"]
        ratio = per / (FB_COUNT[name] * plain)
        rows.append(
            f"| {name} | {FB_COUNT[name]} | {per:.2f} | {per / plain:.2f} | {ratio:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {'met' if ratio <= 1.2 else 'missed'} |"
        )
    table = "\n".join(rows)
    summary = (
        f"Model `{args.model}`, LoRA r=8/alpha=16 on all projections, batch {args.batch_size}, {args.steps} steps "
        f"per run, Alpaca examples of {args.min_tokens}-{args.max_tokens} tokens, fp32, torch threads "
        f"{results['none']['threads']}; each defense with its defaults (`python benchmarks/training.py --defense "
        f"{' '.join(args.defense)} --steps {args.steps}`). One run each; the machine's speed drifts between runs."
    )
    print(table)
    print(summary)
    if not args.no_write:
        machine = f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        with (ROOT / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Defense cost per step — {stamp} — {machine}\n\n{table}\n\n{summary}\n")


def child(which: str, args: argparse.Namespace) -> None:
    spec = (args.model, args.steps, args.batch_size, args.min_tokens, args.max_tokens)
    if which.startswith("defense:"):
        res = run_defense(which.split(":", 1)[1], *spec)
    elif which == "sft":
        res = run_sft(*spec)
    else:
        res = run_engine(*spec, kernels=which == "engine")
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["threads"] = __import__("torch").get_num_threads()
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec for tunesec.models.load_model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=90)
    p.add_argument("--max-tokens", type=int, default=130)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of the two engine runs (medians)")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--defense", nargs="+", choices=sorted(set(FB_COUNT) - {"none"}), help="measure defense costs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    if args.defense:
        defense_costs(args)
        return
    runs: dict[str, list[dict]] = {"sft": [], "engine-plain": [], "engine": []}
    for which in ["sft"] + ["engine-plain", "engine"] * args.rounds:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            which,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--min-tokens",
            str(args.min_tokens),
            "--max-tokens",
            str(args.max_tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
        res = json.loads(line[len("RESULT ") :])
        res["tokens_per_s"] = res["tokens"] / res["seconds"]
        runs[which].append(res)
        print(f"{which}: {res['tokens_per_s']:.0f} tokens/s", flush=True)
    # the median run by speed (a real run, not an average; of an even count the faster middle one)
    results = {k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in runs.items()}
    speedup = results["engine"]["tokens_per_s"] / results["sft"]["tokens_per_s"]
    kernels_gain = results["engine"]["tokens_per_s"] / results["engine-plain"]["tokens_per_s"]
    rows = [
        ("trainer", "tokens", "seconds", "tokens/s", "peak RSS MiB", "final loss"),
        *[
            (
                name,
                str(r["tokens"]),
                f"{r['seconds']:.1f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['loss_last']:.3f}",
            )
            for name, r in (
                ("TRL SFTTrainer", results["sft"]),
                ("tunesec engine, plain kernels", results["engine-plain"]),
                ("tunesec engine", results["engine"]),
            )
        ],
    ]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows[:1])
    table += "\n|" + "---|" * len(rows[0]) + "\n"
    table += "\n".join("| " + " | ".join(row) + " |" for row in rows[1:])
    summary = (
        f"Model `{args.model}`, LoRA r=8/alpha=16 on {', '.join(TARGETS)}, batch {args.batch_size}, "
        f"{args.steps} steps, examples of {args.min_tokens}-{args.max_tokens} tokens (Alpaca 1k, chat template), "
        f"fp32, torch threads {results['engine']['threads']}. Speed-up: **{speedup:.2f}x** tokens/s over "
        f"SFTTrainer; the CPU kernels: {kernels_gain:.2f}x over the engine without them"
        + (
            f" (engine rows: the median of {args.rounds} alternating rounds; tokens/s "
            + ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs["engine"])
            + " vs "
            + ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs["engine-plain"])
            + ")."
            if args.rounds > 1
            else "."
        )
    )
    print(table)
    print(summary)
    if not args.no_write:
        machine = f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}"
        path = ROOT / "BENCHMARKS.md"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        if not path.is_file():
            path.write_text("# Benchmarks\n")
        with path.open("a", encoding="utf-8") as fh:  # append only: other sections are never rewritten
            fh.write(f"\n## Training — {stamp} — {machine}\n\n{table}\n\n{summary}\n")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
