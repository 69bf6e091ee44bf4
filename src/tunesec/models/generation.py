"""The generation engine: batched, length-sorted, left-padded decoding with a KV cache.

Research code typically loops over prompts one at a time with ``model.generate``. This engine instead

- renders every prompt with the model's chat template (sandboxed) and sorts prompts by token length, so a
  batch holds prompts of similar length and little compute goes to padding;
- left-pads each batch, with explicit position ids, so every row sees exactly the positions it would see
  alone (batched greedy output matches one-at-a-time greedy output up to fp32 near-ties);
- prefills with logits for the last position only (no ``batch x length x vocab`` tensor);
- decodes with a KV cache and drops finished rows from the batch, so no compute is spent after EOS;
- picks the batch size from free memory (``batch_size="auto"``) and halves it on out-of-memory;
- samples, when asked, from one seeded random stream per prompt, so a prompt's output does not depend on
  which other prompts share its batch.

A vLLM backend (:class:`VLLMGenerator`) is used instead when vllm is installed and CUDA is present.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.markup import escape

from tunesec.models.chat import ChatFormatter
from tunesec.models.loading import LoadedModel
from tunesec.models.types import Generation, GenerationConfig, Prompt, as_chat
from tunesec.progress import make_progress

# Batches beyond this gain little on a CPU (matmuls are already compute bound) and cost memory.
CPU_MAX_BATCH = 64
GPU_MAX_BATCH = 256
# Fraction of free memory the engine plans to use for activations and the KV cache.
MEMORY_FRACTION = 0.35


class HFGenerator:
    """Batched generation with a Hugging Face causal LM (see the module docstring).

    Args:
        loaded: A model from :func:`tunesec.models.load_model`.
        max_batch_size: Upper bound for ``batch_size="auto"``.
    """

    def __init__(self, loaded: LoadedModel, max_batch_size: int | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.formatter = ChatFormatter(self.tokenizer)
        self.name = loaded.ref.name
        self.max_batch_size = max_batch_size
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def encode(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[int]]:
        """Token ids of each prompt rendered with the chat template."""
        return [self.formatter.encode(as_chat(p, config.system_prompt)) for p in prompts]

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        """Generate one response per prompt, returned in the prompts' order."""
        import torch

        cfg = config or GenerationConfig()
        if not prompts:
            return []
        encoded = self.encode(prompts, cfg)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        results: list[Generation | None] = [None] * len(encoded)
        batch_size = self._batch_size(cfg, max(len(e) for e in encoded))
        with make_progress(enabled=progress) as bar:
            task = bar.add_task(f"generate {escape(self.name)}", total=len(encoded), info="0 tok")
            start = 0
            generated = 0
            while start < len(order):
                idx = order[start : start + batch_size]
                try:
                    with torch.inference_mode():
                        outs = self._generate_batch([encoded[i] for i in idx], idx, cfg)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if "out of memory" not in str(err).lower() or batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    _free_memory()
                    continue
                for i, gen in zip(idx, outs, strict=True):
                    results[i] = gen
                    generated += gen.completion_tokens
                start += len(idx)
                bar.update(task, advance=len(idx), info=f"{generated} tok")
        return [r for r in results if r is not None]

    # -- internals ------------------------------------------------------------------------------------------
    def _batch_size(self, cfg: GenerationConfig, max_prompt_len: int) -> int:
        if cfg.batch_size != "auto":
            return int(cfg.batch_size)
        import torch

        conf = self.model.config
        text_conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
        layers = getattr(text_conf, "num_hidden_layers", 24)
        heads = getattr(text_conf, "num_attention_heads", 16)
        kv_heads = getattr(text_conf, "num_key_value_heads", None) or heads
        hidden = getattr(text_conf, "hidden_size", 1024)
        head_dim = getattr(text_conf, "head_dim", None) or hidden // heads
        inter = getattr(text_conf, "intermediate_size", 4 * hidden)
        vocab = getattr(text_conf, "vocab_size", 32000)
        elem = next(self.model.parameters()).element_size()
        seq = max_prompt_len + cfg.max_new_tokens
        kv = 2 * layers * kv_heads * head_dim * elem * seq
        prefill = max_prompt_len * (4 * hidden + 2 * inter) * elem + heads * max_prompt_len**2 * elem
        per_row = kv + prefill + 2 * vocab * 4
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            cap = GPU_MAX_BATCH
        else:
            import psutil

            free = psutil.virtual_memory().available
            cap = CPU_MAX_BATCH
        cap = min(cap, self.max_batch_size or cap)
        return int(max(1, min(cap, (free * MEMORY_FRACTION) // per_row)))

    def _generate_batch(self, batch: list[list[int]], indices: list[int], cfg: GenerationConfig) -> list[Generation]:
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        t0 = time.perf_counter()
        n = len(batch)
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for r, ids in enumerate(batch):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        samplers = [_RowSampler(cfg, i) for i in indices] if cfg.do_sample else None
        eos = torch.tensor(self.eos_ids, device=device)

        active = torch.arange(n, device=device)  # batch row -> position in `batch`
        outputs: list[list[int]] = [[] for _ in range(n)]
        finish: list[str] = ["length"] * n
        seconds: list[float] = [0.0] * n
        logits = self._forward(input_ids, attention, positions, cache)
        last_pos = positions[:, -1]
        for step in range(cfg.max_new_tokens):
            next_tokens = self._choose(logits, active, samplers)
            rows = active.tolist()
            toks = next_tokens.tolist()
            done_mask = torch.isin(next_tokens, eos)
            done_list = done_mask.tolist()
            now = time.perf_counter() - t0
            for r, tok, done in zip(rows, toks, done_list, strict=True):
                if done:
                    finish[r] = "stop"
                    seconds[r] = now
                else:
                    outputs[r].append(tok)
            if step == cfg.max_new_tokens - 1:
                break
            keep = (~done_mask).nonzero(as_tuple=True)[0]
            if keep.numel() == 0:
                break
            if keep.numel() < active.numel():
                cache.batch_select_indices(keep)
                active = active[keep]
                attention = attention[keep]
                last_pos = last_pos[keep]
                next_tokens = next_tokens[keep]
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
            last_pos = last_pos + 1
            logits = self._forward(next_tokens[:, None], attention, last_pos[:, None], cache)
        end = time.perf_counter() - t0
        results = []
        for r in range(n):
            text = self.tokenizer.decode(outputs[r], skip_special_tokens=True)
            results.append(
                Generation(
                    text=text,
                    prompt_tokens=len(batch[r]),
                    completion_tokens=len(outputs[r]) + (1 if finish[r] == "stop" else 0),
                    finish_reason="stop" if finish[r] == "stop" else "length",
                    seconds=round(seconds[r] if finish[r] == "stop" else end, 4),
                )
            )
        return results

    def _forward(self, ids: Any, attention: Any, positions: Any, cache: Any) -> Any:
        out = self.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    @staticmethod
    def _choose(logits: Any, active: Any, samplers: list[_RowSampler] | None) -> Any:
        if samplers is None:
            return logits.argmax(dim=-1)
        import torch

        rows = active.tolist()
        return torch.stack([samplers[r].sample(logits[k]) for k, r in enumerate(rows)])


class _RowSampler:
    """Temperature / top-k / top-p sampling from a per-prompt seeded stream."""

    def __init__(self, cfg: GenerationConfig, prompt_index: int) -> None:
        import torch

        self.cfg = cfg
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed((cfg.seed * 1_000_003 + prompt_index) % (2**63))

    def sample(self, logits: Any) -> Any:
        import torch

        x = logits.float().cpu() / self.cfg.temperature
        if self.cfg.top_k > 0:
            kth = torch.topk(x, min(self.cfg.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if self.cfg.top_p < 1.0:
            sorted_p, sorted_i = torch.sort(probs, descending=True)
            cum = sorted_p.cumsum(0)
            cut = cum - sorted_p > self.cfg.top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter(0, sorted_i, sorted_p)
            probs = probs / probs.sum()
        return torch.multinomial(probs, 1, generator=self.gen)[0].to(logits.device)


class VLLMGenerator:
    """Generation with vLLM (CUDA only); used by :func:`get_generator` when vllm is installed and a GPU is present.

    Chats are rendered with the same sandboxed template as the local engine, so both backends see identical
    prompt text.
    """

    def __init__(self, model_path: str, tokenizer: Any, name: str, **engine_args: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as err:  # pragma: no cover - vllm is not installed on CPU machines
            raise ImportError("vLLM backend needs `pip install tunesec[vllm]`") from err
        self.name = name
        self.formatter = ChatFormatter(tokenizer)
        self.llm = LLM(model=model_path, tokenizer=model_path, **engine_args)

    def generate(  # pragma: no cover - needs CUDA
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        """Generate with vLLM's continuous batching."""
        from vllm import SamplingParams

        cfg = config or GenerationConfig()
        params = SamplingParams(
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_p=cfg.top_p if cfg.do_sample else 1.0,
            top_k=cfg.top_k if (cfg.do_sample and cfg.top_k > 0) else -1,
            seed=cfg.seed,
        )
        texts = [self.formatter.render(as_chat(p, cfg.system_prompt)) for p in prompts]
        t0 = time.perf_counter()
        outs = self.llm.generate(texts, params, use_tqdm=progress)
        elapsed = time.perf_counter() - t0
        results = []
        for out in outs:
            comp = out.outputs[0]
            results.append(
                Generation(
                    text=comp.text,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(comp.token_ids),
                    finish_reason="length" if comp.finish_reason == "length" else "stop",
                    seconds=round(elapsed, 4),
                )
            )
        return results


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if v not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no EOS token; cannot stop generation")
    return ids


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
