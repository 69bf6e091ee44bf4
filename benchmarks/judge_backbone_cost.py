"""What training a judge costs on this CPU, per backbone: examples/s of one training step at 320 tokens.

- ``minilm-top2``: the shipped cross-encoder's training step (top 2 of 6 MiniLM layers + head, from cached states);
- ``minilm-full``: the same encoder with all 6 layers trained (a full fine-tune);
- ``smollm2-lora``: SmolLM2-135M with LoRA r=8 on the attention and MLP projections and a 2-logit head on the last
  token (a tiny Llama-Guard), on the engine's CPU training kernels.

Projects the hours for the leave-one-source-out protocol of ``scripts/train_judge.py`` (5 folds of ~7,300 training
pairs + the final fit on ~8,600, one epoch). Prints a markdown table and appends it to BENCHMARKS.md.

Usage: .venv/bin/python benchmarks/judge_backbone_cost.py [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LENGTH, BATCH, STEPS = 320, 8, 3
PROTOCOL_PAIRS = 5 * 7300 + 8600


def timed(step) -> float:
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(STEPS):
        step()
    return STEPS * BATCH / (time.perf_counter() - t)


def minilm(top_layers: int) -> float:
    from tunesec.judges.cross_encoder import CrossEncoderConfig, load_model

    _, model = load_model(None, CrossEncoderConfig(top_layers=top_layers))
    model.train()
    ids = torch.randint(1000, 20000, (BATCH, LENGTH))
    types = torch.zeros_like(ids)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model.lower(ids, types, mask)
    opt = torch.optim.AdamW(model.top_parameters(), lr=1e-5)

    def step() -> None:
        logits = model.upper(hidden, mask)
        logits.sum().backward()
        opt.step()
        opt.zero_grad()

    return timed(step)


def smollm2_lora() -> float:
    from peft import LoraConfig, get_peft_model

    from tunesec.models.cpu_kernels import cpu_training
    from tunesec.models.loading import load_model

    loaded = load_model("smollm2-135m")
    lm = get_peft_model(
        loaded.model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    head = torch.nn.Linear(lm.config.hidden_size, 2)
    params = [p for p in lm.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(1000, 20000, (BATCH, LENGTH))
    lm.train()

    def step() -> None:
        out = lm.base_model.model.model(input_ids=ids)
        logits = head(out.last_hidden_state[:, -1])
        logits.sum().backward()
        opt.step()
        opt.zero_grad()

    with cpu_training(lm):
        return timed(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, fn in (("minilm-top2 (shipped)", lambda: minilm(2)), ("minilm-full", lambda: minilm(6)),
                     ("smollm2-lora", smollm2_lora)):  # fmt: skip
        rate = fn()
        rows.append(f"| {name} | {rate:.1f} | {PROTOCOL_PAIRS / rate / 3600:.2f} |")
        print(rows[-1], flush=True)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    table = "\n".join(
        [
            f"One training step (forward, backward, AdamW) of batch {BATCH} at {LENGTH} tokens, {STEPS} steps after a "
            f"warm-up; hours = the leave-one-source-out protocol's {PROTOCOL_PAIRS:,} training pairs at that rate "
            "(the MiniLM rows start from cached frozen-layer states, as scripts/train_judge.py does; caching itself "
            "took 384 s).",
            "",
            "| backbone | training pairs/s | hours for LOSO + final fit |",
            "|---|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if not args.no_write:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        with (ROOT / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Judge training cost by backbone — {stamp} — {machine}\n\n{table}\n")


if __name__ == "__main__":
    main()
