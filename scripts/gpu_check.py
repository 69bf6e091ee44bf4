"""One GPU check of the scale-out paths: vLLM vs the HF engine, LoRA in bf16, and DDP over two GPUs.

Run on a machine with CUDA (the lead runs it when a GPU is lent; BENCHMARKS.md records the table):

    python scripts/gpu_check.py            # table on stdout; exit 0 when every check passed, 1 otherwise

Without CUDA it prints one line and exits 2. Everything it needs is built here: a tiny random Llama model and a
byte-level tokenizer saved to a temporary directory (no download). The checks:

1. ``hf-generate``: the HF engine (tunesec.models.generation.HFGenerator) on the GPU, greedy, 64 prompts.
2. ``vllm-generate``: the same prompts through ``VLLMGenerator`` (skipped when vllm is not installed); passes when
   its greedy answers equal the HF engine's on at least 90% of the prompts (bf16 kernels differ, near-ties flip).
3. ``lora-bf16``: 10 LoRA steps in bf16 through tunesec's engine (``tunesec.training.train``); passes when the
   loss is finite and falls and the adapter is saved as safetensors.
4. ``ddp-2gpu`` (only with two or more GPUs): the same training with ``--processes 2``-style launch of this
   script's worker on two GPUs; passes when its 10 losses equal a one-GPU run's with the same global batch within
   1e-2 relative (bf16) and rank 1 wrote no file.

Each row reports throughput (generated tokens/s, or trained tokens/s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [f"Question {i}: how do I bake bread with {i % 7} cups of flour?" for i in range(64)]
STEPS = 10


def build_model(path: Path) -> Path:
    """A tiny random Llama (4 layers, hidden 256) and a byte-level BPE tokenizer with a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(PROMPTS * 4 + ["Sure, mix flour, water, salt and yeast, then bake."] * 8, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])  # fmt: skip
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def examples(n: int = 64) -> list[Any]:
    from tunesec.data.schema import Example, Message

    return [
        Example(id=f"e{i}", messages=[Message(role="user", content=PROMPTS[i % len(PROMPTS)]),
                                      Message(role="assistant", content="Sure, mix flour, water, salt and yeast.")])
        for i in range(n)
    ]  # fmt: skip


def check_generation(model_dir: Path) -> list[dict[str, Any]]:
    from tunesec.models import GenerationConfig, get_generator

    cfg = GenerationConfig(max_new_tokens=64)
    rows: list[dict[str, Any]] = []
    hf = get_generator(str(model_dir), backend="hf", device="cuda")
    hf.generate(PROMPTS[:4], cfg, progress=False)  # warm-up
    t0 = time.perf_counter()
    want = hf.generate(PROMPTS, cfg, progress=False)
    secs = time.perf_counter() - t0
    ok = all(g.completion_tokens > 0 for g in want)
    rows.append(_row("hf-generate", ok, sum(g.completion_tokens for g in want) / secs, "tok/s", f"{len(want)} prompts"))
    try:
        import vllm  # noqa: F401
    except ImportError:
        rows.append(
            _row("vllm-generate", None, 0.0, "tok/s", "skipped: vllm not installed (pip install tunesec[vllm])")
        )
        return rows
    import torch

    del hf
    torch.cuda.empty_cache()  # vLLM takes 90% of the free memory by default
    gen = get_generator(str(model_dir), backend="vllm")
    gen.generate(PROMPTS[:4], cfg, progress=False)
    t0 = time.perf_counter()
    got = gen.generate(PROMPTS, cfg, progress=False)
    secs = time.perf_counter() - t0
    same = sum(g.text == w.text for g, w in zip(got, want, strict=True)) / len(want)
    rows.append(_row("vllm-generate", same >= 0.9, sum(g.completion_tokens for g in got) / secs, "tok/s",
                     f"{same:.0%} of greedy answers equal the HF engine's"))  # fmt: skip
    return rows


def train_once(model_dir: Path, out: Path, batch: int, accum: int) -> Any:
    import torch

    from tunesec.models import load_model
    from tunesec.training import TrainConfig, train

    loaded = load_model(str(model_dir), device="cuda", dtype=torch.bfloat16)
    cfg = TrainConfig(max_steps=STEPS, per_device_batch_size=batch, gradient_accumulation_steps=accum, bf16=True,
                      learning_rate=1e-3, save_steps=5, check_memory=False)  # fmt: skip
    return train(loaded, examples(), cfg, out_dir=out, progress=False)


def check_lora(model_dir: Path, tmp: Path) -> dict[str, Any]:
    result = train_once(model_dir, tmp / "lora", batch=4, accum=2)
    losses = result.metrics.losses
    import math

    ok = (all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
          and (result.output_dir / "adapter_model.safetensors").is_file())  # fmt: skip
    return _row("lora-bf16", ok, result.metrics.tokens_per_second, "tok/s",
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps")  # fmt: skip


def check_ddp(model_dir: Path, tmp: Path) -> dict[str, Any]:
    single = train_once(model_dir, tmp / "one", batch=4, accum=2)
    out = tmp / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "--worker", str(model_dir), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    reports = [json.loads(line[7:]) for line in lines if line.startswith("REPORT ")]
    if proc.returncode != 0 or len(reports) != 2:
        return _row("ddp-2gpu", False, 0.0, "tok/s", f"launch failed ({proc.returncode}): {proc.stderr[-300:]}")
    main = next(r for r in reports if r["rank"] == 0)
    worst = max(abs(a - b) / abs(b) for a, b in zip(main["losses"], single.metrics.losses, strict=True))
    no_writes = all(not r["writes"] for r in reports if r["rank"] != 0)
    return _row("ddp-2gpu", worst <= 1e-2 and no_writes, main["tokens_per_second"], "tok/s",
                f"losses within {worst:.1e} of 1 GPU; rank 1 writes: {'none' if no_writes else 'SOME'}")  # fmt: skip


def worker(model_dir: Path, out: Path) -> None:
    from tunesec.training import distributed

    distributed.init_process_group()  # each rank on its own GPU before the model loads
    writes: list[str] = []
    if not distributed.is_main_process():
        distributed.guard_worker_writes(on_write=lambda event, path: writes.append(f"{event} {path}"))
    result = train_once(model_dir, out, batch=4, accum=1)
    report = {"rank": distributed.rank(), "losses": result.metrics.losses, "writes": writes,
              "tokens_per_second": result.metrics.tokens_per_second}  # fmt: skip
    # rank 0 on stdout, the others on stderr, one write each: the reports cannot interleave
    os.write(1 if distributed.is_main_process() else 2, ("REPORT " + json.dumps(report) + "\n").encode())


def _row(name: str, ok: bool | None, rate: float, unit: str, note: str) -> dict[str, Any]:
    return {"check": name, "result": "skip" if ok is None else ("pass" if ok else "FAIL"),
            "throughput": f"{rate:,.0f} {unit}" if rate else "-", "note": note}  # fmt: skip


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing checked (run it on a GPU machine)")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tunesec-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_model(tmp / "tiny")
        try:
            rows.extend(check_generation(model_dir))
        except Exception as exc:  # noqa: BLE001 - a failed check is a FAIL row, the others still run
            rows.append(_row("generate", False, 0.0, "", f"{type(exc).__name__}: {exc}"))
        try:
            rows.append(check_lora(model_dir, tmp))
        except Exception as exc:  # noqa: BLE001
            rows.append(_row("lora-bf16", False, 0.0, "", f"{type(exc).__name__}: {exc}"))
        if torch.cuda.device_count() >= 2:
            try:
                rows.append(check_ddp(model_dir, tmp))
            except Exception as exc:  # noqa: BLE001
                rows.append(_row("ddp-2gpu", False, 0.0, "", f"{type(exc).__name__}: {exc}"))
        else:
            rows.append(_row("ddp-2gpu", None, 0.0, "", f"skipped: {torch.cuda.device_count()} GPU"))
    gpu = torch.cuda.get_device_name(0)
    print(f"tunesec gpu_check on {torch.cuda.device_count()} x {gpu}, torch {torch.__version__}")
    print(f"| {'check':<14} | {'result':<6} | {'throughput':>14} | note")
    print(f"|{'-' * 16}|{'-' * 8}|{'-' * 16}|{'-' * 40}")
    for r in rows:
        print(f"| {r['check']:<14} | {r['result']:<6} | {r['throughput']:>14} | {r['note']}")
    return 0 if all(r["result"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main())
