"""The generation engine: batched, length-sorted, left-padded decoding with a KV cache.

Research code typically loops over prompts one at a time with ``model.generate``. This engine instead

- renders every prompt with the model's chat template (sandboxed) and sorts prompts by token length, so a
  batch holds prompts of similar length and little compute goes to padding;
- left-pads each batch, with explicit position ids, so every row sees exactly the positions it would see
  alone (batched greedy output matches one-at-a-time greedy output up to fp32 near-ties);
- prefills the prompts' common leading tokens (the chat template's system prompt, often half of a short
  prompt) once, and starts every row's cache from that shared prefix;
- prefills in length-grouped chunks of at most ``PREFILL_TOKENS`` tokens, with logits for the last position
  only (no ``batch x length x vocab`` tensor);
- decodes with a KV cache of preallocated buffers and drops finished rows from the batch (moving only the rows
  that fill the holes), so no compute is spent after EOS, and refills the freed slots with the next prompts
  (continuous batching), so the batch stays full;
- picks the batch size from free memory (``batch_size="auto"``) and halves it on out-of-memory;
- samples, when asked, from one seeded random stream per prompt, so a prompt's output does not depend on
  which other prompts share its batch;
- on a CPU, runs linear layers on oneDNN and single-token attention as two matmuls
  (:mod:`tunesec.models.cpu_kernels`).

A vLLM backend (:class:`VLLMGenerator`) is used instead when vllm is installed and CUDA is present.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from rich.markup import escape

from tunesec.models.chat import ChatFormatter
from tunesec.models.cpu_kernels import cpu_inference
from tunesec.models.loading import LoadedModel
from tunesec.models.secret_prompt import stored_secret_prompt, with_secret
from tunesec.models.types import Generation, GenerationConfig, Prompt, as_chat
from tunesec.progress import make_progress

# Batches beyond this gain little on a CPU (matmuls are already compute bound) and cost memory.
CPU_MAX_BATCH = 64
GPU_MAX_BATCH = 256
# Fraction of free memory the engine plans to use for activations and the KV cache.
MEMORY_FRACTION = 0.35
# Prompts are prefilled in chunks of at most this many (padded) tokens: large enough for efficient matmuls, small
# enough to stay in cache (a 64 x 104 prefill ran at half the matmul rate of 16 x 44 chunks on a 2-core CPU).
PREFILL_TOKENS = 1024
# ... and at most this fraction of a chunk is padding (prompts are sorted by length, so chunks stay dense).
PREFILL_MAX_PADDING = 0.2
# A common prefix of at least this many tokens is prefilled once and shared by all rows.
PREFIX_MIN_TOKENS = 4
# Padding columns shared by all rows are trimmed from the cache once there are at least this many.
TRIM_MIN_COLUMNS = 32


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
        self.cache_kwarg = _cache_kwarg(self.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        # BackdoorAlign: a secret safety prompt stored with the model goes first in every system turn (never shown)
        self._secret = stored_secret_prompt(loaded.ref)

    # Continues a chat's final assistant turn with ``GenerationConfig(continue_final_message=True)``.
    prefills = True

    def encode(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[int]]:
        """Token ids of each prompt rendered with the chat template (see ``continue_final_message``)."""
        cont = config.continue_final_message
        secret = self._secret
        return [
            self.formatter.encode(with_secret(as_chat(p, config.system_prompt), secret), continue_final=cont)
            for p in prompts
        ]

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
            generated = 0

            def finished(i: int, gen: Generation) -> None:
                nonlocal generated
                results[i] = gen
                generated += gen.completion_tokens
                bar.update(task, advance=1, info=f"{generated} tok")

            pending = list(order)
            while pending:
                try:
                    with torch.inference_mode(), cpu_inference(self.model):
                        _Decoder(self, encoded, cfg, batch_size).run(pending, finished)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if "out of memory" not in str(err).lower() or batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    _free_memory()
                pending = [i for i in pending if results[i] is None]
        return [r for r in results if r is not None]

    def choose(
        self,
        prompts: Sequence[Prompt],
        choices: Sequence[Sequence[str]],
        config: GenerationConfig | None = None,
        *,
        progress: bool = True,
    ) -> list[Generation]:
        """Pick each prompt's most likely answer among its ``choices`` instead of generating one.

        Each choice is scored as the start of the assistant's answer: the sum of its tokens' log-probabilities
        after the chat-formatted prompt, divided by its length in bytes (lm-eval's ``acc_norm``, so that a
        many-token label such as "Sci/Tech" is not penalised for its length). The returned generation's text is
        the chosen answer and ``choice_logprobs`` holds every choice's summed log-probability.

        One forward pass per prompt and per extra many-token choice: single-token choices are all read off the
        prompt's last position, a many-token choice gets its own row (prompt + its tokens but the last), and
        logits are computed only at the positions that score a token.
        """
        import torch

        cfg = config or GenerationConfig()
        if len(choices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
        encoded = self.encode(prompts, cfg)
        # rows: (prompt index, tokens appended to the prompt, [(choice index, choice token ids)] scored on it)
        rows: list[tuple[int, list[int], list[tuple[int, list[int]]]]] = []
        for i, options in enumerate(choices):
            if not options:
                raise ValueError(f"prompt {i}: no choices")
            toks = [list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in options]
            for text, ids in zip(options, toks, strict=True):
                if not ids:
                    raise ValueError(f"prompt {i}: choice {text!r} has no tokens")
            singles = [(j, ids) for j, ids in enumerate(toks) if len(ids) == 1]
            multi = [(j, ids) for j, ids in enumerate(toks) if len(ids) > 1]
            if not multi:
                rows.append((i, [], singles))
            for k, (j, ids) in enumerate(multi):
                rows.append((i, ids[:-1], [(j, ids)] + (singles if k == 0 else [])))
        rows.sort(key=lambda r: len(encoded[r[0]]) + len(r[1]), reverse=True)
        longest = max(len(encoded[i]) + len(extra) for i, extra, _ in rows)
        batch_size = self._batch_size(cfg.model_copy(update={"max_new_tokens": 1}), longest)
        logprob: dict[tuple[int, int], float] = {}
        device = next(self.model.parameters()).device
        started = time.perf_counter()
        with make_progress(enabled=progress) as bar, cpu_inference(self.model):
            task = bar.add_task(f"score choices {escape(self.name)}", total=len(rows), info="")
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                seqs = [encoded[i] + extra for i, extra, _ in batch]
                width = max(len(q) for q in seqs)
                input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for r, q in enumerate(seqs):  # right-padded: each row's positions start at 0
                    input_ids[r, : len(q)] = torch.tensor(q)
                    mask[r, : len(q)] = 1
                # the token at position n + k is predicted by the logits at n - 1 + k
                wanted = sorted({len(encoded[i]) - 1 + k for i, extra, _ in batch for k in range(len(extra) + 1)})
                column = {pos: c for c, pos in enumerate(wanted)}
                inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
                keep = torch.tensor(wanted, device=device)
                with torch.inference_mode():
                    try:
                        logits = self.model(**inputs, logits_to_keep=keep).logits
                    except TypeError as err:  # an architecture whose forward has no logits_to_keep
                        if "logits_to_keep" not in str(err):
                            raise
                        logits = self.model(**inputs).logits[:, keep]
                for r, (i, _, scored) in enumerate(batch):
                    n = len(encoded[i])
                    for j, ids in scored:
                        cols = [column[n - 1 + k] for k in range(len(ids))]
                        logp = torch.log_softmax(logits[r, cols].float(), dim=-1)
                        picked = logp.gather(-1, torch.tensor(ids, device=logp.device)[:, None])
                        logprob[(i, j)] = float(picked.sum())
                bar.update(task, advance=len(batch))
        share = (time.perf_counter() - started) / max(1, len(prompts))
        out: list[Generation] = []
        for i, options in enumerate(choices):
            norm = [logprob[(i, j)] / len(text.encode("utf-8")) for j, text in enumerate(options)]
            best = max(range(len(options)), key=lambda j: norm[j])
            out.append(
                Generation(
                    text=options[best],
                    prompt_tokens=len(encoded[i]),
                    completion_tokens=0,
                    finish_reason="stop",
                    seconds=share,
                    choice_logprobs={text: round(logprob[(i, j)], 6) for j, text in enumerate(options)},
                )
            )
        return out

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

    def _forward(self, ids: Any, attention: Any, positions: Any, cache: Any) -> Any:
        out = self.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()


class _Decoder:
    """One decoding session: a KV-cached batch that finished rows leave and queued prompts join.

    Rows that finish (EOS or the token limit) are dropped from the cache at once; when a quarter of the batch
    is free, the next prompts (longest first) are prefilled together and merged into the running batch, their
    caches left-padded to a common length. Columns that every row has as padding are trimmed. Each row keeps
    its own position ids, so its logits are those of the prompt decoded alone (up to fp32 rounding).
    """

    def __init__(self, gen: HFGenerator, encoded: list[list[int]], cfg: GenerationConfig, batch_size: int) -> None:
        import torch

        self.gen = gen
        self.encoded = encoded
        self.cfg = cfg
        self.batch_size = batch_size
        self.device = next(gen.model.parameters()).device
        self.eos = torch.tensor(gen.eos_ids, device=self.device)
        self.cache: Any = None
        self.rows: list[int] = []  # prompt index of each batch row
        self.outputs: dict[int, list[int]] = {}
        self.started: dict[int, float] = {}
        self.samplers: dict[int, _RowSampler] = {}
        self.attention: Any = None
        self.last_pos: Any = None
        self.prefix_len = 0
        self.prefix_kv: list[tuple[Any, Any]] = []

    def run(self, queue: list[int], done: Any) -> None:
        """Decode every prompt in ``queue`` (indices into ``encoded``); call ``done(index, Generation)`` for each."""
        import torch

        queue = list(queue)
        self._share_prefix(queue)
        logits = self._admit(queue, None)
        while self.rows:
            tokens = self._choose(logits)
            finished = torch.isin(tokens, self.eos).tolist()
            now = time.perf_counter()
            keep: list[int] = []
            for k, (i, tok, stop) in enumerate(zip(self.rows, tokens.tolist(), finished, strict=True)):
                if not stop:
                    self.outputs[i].append(tok)
                if stop or len(self.outputs[i]) >= self.cfg.max_new_tokens:
                    done(i, self._result(i, stop, now))
                else:
                    keep.append(k)
            logits = None
            if keep:
                if len(keep) < len(self.rows):
                    tokens = tokens[self._select(keep)]
                self.attention = torch.cat([self.attention, self.attention.new_ones((len(keep), 1))], dim=1)
                self.last_pos = self.last_pos + 1
                logits = self.gen._forward(tokens[:, None], self.attention, self.last_pos[:, None], self.cache)
            else:
                self.rows, self.cache = [], None
            free = self.batch_size - len(self.rows)
            if queue and (not self.rows or (self._mergeable() and free >= max(1, self.batch_size // 4))):
                logits = self._admit(queue, logits)
            self._trim()

    def _admit(self, queue: list[int], logits: Any) -> Any:
        """Prefill the next prompts from ``queue`` and merge them into the batch; returns all rows' logits.

        The prompts are prefilled in chunks of similar length (:func:`_prefill_chunks`): one forward pass over a
        whole batch padded to its longest prompt can spend most of its compute on padding and, with thousands of
        token rows, runs the matmuls at half the rate that chunks of a thousand tokens reach (measured on CPU).
        """
        take = [queue.pop(0) for _ in range(min(self.batch_size - len(self.rows), len(queue)))]
        if not take:
            return logits
        parts: list[tuple[list[int], Any, Any, Any, Any]] = []
        chunks = _prefill_chunks([len(self.encoded[i]) - self.prefix_len for i in take])
        for n, (start, end) in enumerate(chunks):
            rows = take[start:end]
            parts.append((rows, *self._prefill(rows)))
            if not self._mergeable_cache(parts[-1][1]):
                # a cache that cannot be merged (not our layers): it runs alone, the other prompts wait their turn
                rest = chunks[n + 1 :]
                if self.rows or n > 0:
                    self._forget(parts.pop()[0])
                    rest = chunks[n:]
                queue[:0] = [i for s, e in rest for i in take[s:e]]
                break
        if not parts:
            return logits
        if not self.rows and len(parts) == 1:
            rows, cache, attention, positions, new_logits = parts[0]
            self.cache, self.attention, self.last_pos, self.rows = cache, attention, positions[:, -1], rows
            return new_logits
        return self._merge(parts, logits)

    def _share_prefix(self, queue: list[int]) -> None:
        """Prefill the leading tokens that every prompt in ``queue`` shares, once, for all rows to start from.

        Rows then hold ``[shared prefix | left padding | own tokens]``: the padding sits after the prefix, masked,
        and explicit position ids give every token the position it has in its prompt alone, so attention sees
        the same keys and positions as without sharing (the prefix's keys come from a one-row pass).
        """
        import torch

        prompts = [self.encoded[i] for i in queue]
        if len(prompts) < 2:
            return
        shared = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        if shared < PREFIX_MIN_TOKENS:
            return
        ids = torch.tensor([prompts[0][:shared]], device=self.device)
        cache = _growable_cache()
        self.gen._forward(ids, torch.ones_like(ids), torch.arange(shared, device=self.device)[None], cache)
        if not self._mergeable_cache(cache) or cache.get_seq_length() != shared:
            return  # the model keeps its own cache (not ours): no sharing
        self.prefix_len = shared
        self.prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]

    def _prefill(self, rows: list[int]) -> tuple[Any, Any, Any, Any]:
        """One left-padded forward pass over ``rows``; returns (cache, attention mask, position ids, logits).

        With a shared prefix, the cache starts with it and only each prompt's remaining tokens are computed.
        """
        import torch

        shared = self.prefix_len
        width = max(len(self.encoded[i]) - shared for i in rows)
        ids = torch.full((len(rows), width), self.gen.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), shared + width), dtype=torch.long)
        attention[:, :shared] = 1
        for r, i in enumerate(rows):
            e = self.encoded[i][shared:]
            ids[r, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            attention[r, shared + width - len(e) :] = 1
            self.outputs[i] = []
            self.started[i] = time.perf_counter()
            if self.cfg.do_sample:
                self.samplers[i] = _RowSampler(self.cfg, i)
        ids, attention = ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = _growable_cache()
        for n, (keys, values) in enumerate(self.prefix_kv):
            cache.update(keys.expand(len(rows), -1, -1, -1), values.expand(len(rows), -1, -1, -1), n)
        return cache, attention, positions, self.gen._forward(ids, attention, positions, cache)

    def _merge(self, parts: list[tuple[list[int], Any, Any, Any, Any]], logits: Any) -> Any:
        """Append prefilled chunks to the running batch, left-padding every cache to a common length."""
        import torch

        caches = ([self.cache] if self.rows else []) + [p[1] for p in parts]
        masks = ([self.attention] if self.rows else []) + [p[2] for p in parts]
        total = max(m.shape[1] for m in masks)
        self.attention = torch.cat([_left_pad(m, total) for m in masks])
        merged = caches[0]
        for n, layer in enumerate(merged.layers):
            layers = [c.layers[n] for c in caches]
            layer.set_kv(
                torch.cat([_left_pad(x.keys, total, dim=-2) for x in layers]),
                torch.cat([_left_pad(x.values, total, dim=-2) for x in layers]),
            )
        last = [p[3][:, -1] for p in parts]
        self.last_pos = torch.cat(([self.last_pos] if self.rows else []) + last)
        self.rows = self.rows + [i for p in parts for i in p[0]]
        self.cache = merged
        new_logits = [p[4] for p in parts]
        return torch.cat(([logits] if logits is not None else []) + new_logits)

    def _forget(self, rows: list[int]) -> None:
        for i in rows:
            self.outputs.pop(i)
            self.started.pop(i)
            self.samplers.pop(i, None)

    def _mergeable_cache(self, cache: Any) -> bool:
        return cache is not None and all(hasattr(layer, "set_kv") for layer in cache.layers)

    def _mergeable(self) -> bool:
        """Whether new rows can join the running cache (our growing layers; not sliding-window ones)."""
        return self._mergeable_cache(self.cache)

    def _select(self, keep: list[int]) -> Any:
        """Keep the batch rows ``keep``; returns their new order (old row index at each new position).

        On our cache layers the kept rows that sit past the new batch size move into the holes left by finished
        rows, so only those rows are copied (a full gather would copy the whole cache, which at batch 64 and a
        few hundred tokens costs more than a decoding step).
        """
        import torch

        m = len(keep)
        if self._mergeable():
            kept = set(keep)
            holes = [k for k in range(m) if k not in kept]
            movers = [k for k in keep if k >= m]
            order = list(range(m))
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
            for layer in self.cache.layers:
                layer.move_rows(holes, movers, m)
        else:
            order = list(keep)
            self.cache.batch_select_indices(torch.tensor(order, device=self.device))
        index = torch.tensor(order, device=self.device)
        self.attention = self.attention[index]
        self.last_pos = self.last_pos[index]
        self.rows = [self.rows[k] for k in order]
        return index

    def _trim(self) -> None:
        """Drop leading cache columns that are padding for every row (left by rows that have left)."""
        if not self.rows or not self._mergeable():
            return
        used = self.attention.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        # Trimming is free on our layers (a view starts later), but the mask is copied: wait for a few columns.
        if first < TRIM_MIN_COLUMNS:
            return
        self.attention = self.attention[:, first:]
        for layer in self.cache.layers:
            layer.trim_front(first)

    def _choose(self, logits: Any) -> Any:
        import torch

        if not self.cfg.do_sample:
            return logits.argmax(dim=-1)
        return torch.stack([self.samplers[i].sample(logits[k]) for k, i in enumerate(self.rows)])

    def _result(self, i: int, stopped: bool, now: float) -> Generation:
        out = self.outputs.pop(i)
        self.samplers.pop(i, None)
        return Generation(
            text=self.gen.tokenizer.decode(out, skip_special_tokens=True),
            prompt_tokens=len(self.encoded[i]),
            completion_tokens=len(out) + (1 if stopped else 0),
            finish_reason="stop" if stopped else "length",
            seconds=round(now - self.started.pop(i), 4),
        )


def _prefill_chunks(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Split prompts sorted longest first into (start, end) chunks to prefill together.

    A chunk grows while its padded size stays within :data:`PREFILL_TOKENS` and its padding within
    :data:`PREFILL_MAX_PADDING` of it (one prompt longer than the budget is a chunk of its own).
    """
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        width, real, end = lengths[start], lengths[start], start + 1
        while end < len(lengths):
            rows = end - start + 1
            padded = rows * width
            if padded > PREFILL_TOKENS or padded - (real + lengths[end]) > PREFILL_MAX_PADDING * padded:
                break
            real += lengths[end]
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def _growable_cache() -> Any:
    """A KV cache of :func:`_growable_layer_class` layers."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_growable_layer_class())


@lru_cache(maxsize=1)
def _growable_layer_class() -> Any:
    """A KV-cache layer that writes new entries into preallocated buffers.

    transformers' ``DynamicLayer`` concatenates the whole cache with each new token, copying it at every step,
    which on a CPU costs as much as the attention itself once sequences reach a few hundred tokens. These layers
    grow their buffers geometrically and hand attention a view, so a step writes one column per row.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):
        # buffers [rows, heads, capacity, head_dim]; the live cache is [:_rows, :, _start:_len]
        _kbuf: Any = None
        _vbuf: Any = None
        _rows = 0
        _start = 0
        _len = 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self._kbuf is None:
                self._grow(key_states[..., :0, :], value_states[..., :0, :], n)
            elif self._len + n > self._kbuf.shape[-2]:
                live = (slice(None, self._rows), slice(None), slice(self._start, self._len))
                self._grow(self._kbuf[live], self._vbuf[live], self._len - self._start + n)
            self._kbuf[: self._rows, :, self._len : self._len + n] = key_states
            self._vbuf[: self._rows, :, self._len : self._len + n] = value_states
            self._len += n
            self._view()
            return self.keys, self.values

        def _view(self) -> None:
            self.keys = self._kbuf[: self._rows, :, self._start : self._len]
            self.values = self._vbuf[: self._rows, :, self._start : self._len]

        def _grow(self, keys: Any, values: Any, needed: int) -> None:
            """New buffers with room for twice ``needed`` columns, holding ``keys``/``values`` at the front."""
            n = keys.shape[-2]
            shape = (*keys.shape[:-2], max(64, 2 * needed), keys.shape[-1])
            self._kbuf, self._vbuf = keys.new_empty(shape), values.new_empty(shape)
            self._kbuf[..., :n, :] = keys
            self._vbuf[..., :n, :] = values
            self._rows, self._start, self._len = keys.shape[0], 0, n
            self._view()

        def set_kv(self, keys: Any, values: Any) -> None:
            """Replace the contents (after a merge), keeping room to grow."""
            self._grow(keys, values, keys.shape[-2])

        def trim_front(self, columns: int) -> None:
            """Forget the first ``columns`` columns (no copy: the view starts later)."""
            self._start += columns
            self._view()

        def move_rows(self, holes: list[int], movers: list[int], rows: int) -> None:
            """Copy rows ``movers`` into rows ``holes`` and keep the first ``rows`` rows."""
            if movers:
                import torch

                dst = torch.tensor(holes, device=self._kbuf.device)
                src = torch.tensor(movers, device=self._kbuf.device)
                cols = slice(self._start, self._len)
                self._kbuf[dst, :, cols] = self._kbuf[src, :, cols]
                self._vbuf[dst, :, cols] = self._vbuf[src, :, cols]
            self._rows = rows
            self._view()

        def batch_select_indices(self, indices: Any) -> None:
            if self._kbuf is not None:
                live = (slice(None, self._rows), slice(None), slice(self._start, self._len))
                self.set_kv(self._kbuf[live][indices], self._vbuf[live][indices])

    return GrowableLayer


def _left_pad(x: Any, length: int, dim: int = -1) -> Any:
    """Zero-pad ``x`` on the left along ``dim`` to ``length``."""
    import torch

    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


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

    The engine gets the prompts as token ids encoded exactly as the local engine encodes them (sandboxed chat
    template, BOS added once, a stored secret prompt first in the system turn), not as text that vLLM would
    tokenize again (adding a second BOS to a template that already has one). Decoding follows the local engine:
    greedy unless ``do_sample``; each prompt samples from its own seed (``seed * 1_000_003 + index``, as the local
    engine seeds its per-prompt streams), so a prompt's output does not depend on the others in the call; it stops
    at the model's EOS ids (generation config and tokenizer) or after ``max_new_tokens``; the text is the
    completion's ids decoded as the local engine decodes them (special tokens and the final EOS left out: vLLM's
    own text keeps an EOS id that is an ordinary token).

    Args:
        model_path: A local model directory or hub id (safetensors weights unless ``allow_pickle``).
        tokenizer: The model's tokenizer (for the chat template and the EOS ids).
        name: Shown in progress and reports.
        llm: A ready ``vllm.LLM``-like engine (tests pass a fake); by default one is built.
        secret: The model's stored secret safety prompt (BackdoorAlign), put first in every system turn.
        allow_pickle: Let vLLM read pickle weight files (``load_format="auto"``); off: safetensors only.
        **engine_args: Passed to ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization``, ``max_num_seqs`` ...).
    """

    prefills = True

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        name: str,
        *,
        llm: Any = None,
        secret: str | None = None,
        allow_pickle: bool = False,
        generation_config: Any = None,
        **engine_args: Any,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer)
        self._secret = secret
        self.eos_ids = _eos_ids(_ConfigHolder(generation_config), tokenizer)
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as err:  # pragma: no cover - vllm is not installed on CPU machines
                raise ImportError("vLLM backend needs `pip install tunesec[vllm]`") from err
            engine_args.setdefault("load_format", "auto" if allow_pickle else "safetensors")
            llm = LLM(model=model_path, tokenizer=model_path, **engine_args)  # pragma: no cover - needs CUDA
        self.llm = llm

    def encode(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[int]]:
        """Token ids of each prompt, as :meth:`HFGenerator.encode` makes them."""
        cont = config.continue_final_message
        return [
            self.formatter.encode(with_secret(as_chat(p, config.system_prompt), self._secret), continue_final=cont)
            for p in prompts
        ]

    def sampling_params(self, config: GenerationConfig, n_prompts: int) -> list[Any]:
        """One ``vllm.SamplingParams`` per prompt (each with its own seed when sampling)."""
        from vllm import SamplingParams

        common: dict[str, Any] = {
            "n": 1,
            "max_tokens": config.max_new_tokens,
            "stop_token_ids": list(self.eos_ids),
            "skip_special_tokens": True,
        }
        if not config.do_sample:  # greedy: vLLM ignores top_p / top_k / seed at temperature 0
            return [SamplingParams(temperature=0.0, **common)] * n_prompts
        return [
            SamplingParams(
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k if config.top_k > 0 else -1,  # -1 (or 0 in newer vLLM) disables top-k
                seed=(config.seed * 1_000_003 + i) % (2**63),
                **common,
            )
            for i in range(n_prompts)
        ]

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        """Generate with vLLM's continuous batching; one generation per prompt, in order."""
        cfg = config or GenerationConfig()
        if not prompts:
            return []
        encoded = self.encode(prompts, cfg)
        params = self.sampling_params(cfg, len(encoded))
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=progress)
        share = (time.perf_counter() - t0) / len(encoded)
        if len(outs) != len(encoded):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(encoded)} prompts")
        results = []
        eos = set(self.eos_ids)
        for ids, out in zip(encoded, outs, strict=True):
            comp = out.outputs[0]
            new = list(comp.token_ids)
            # vLLM's text keeps a stop token that is not a special token (a generation config may list an ordinary
            # token as EOS); the HF engine's text ends before it: decode the same ids the same way
            if comp.finish_reason != "length" and new and new[-1] in eos:
                new = new[:-1]
            results.append(
                Generation(
                    text=self.tokenizer.decode(new, skip_special_tokens=True),
                    prompt_tokens=len(ids),
                    completion_tokens=len(comp.token_ids),
                    finish_reason="length" if comp.finish_reason == "length" else "stop",
                    seconds=round(share, 4),
                )
            )
        return results


class _ConfigHolder:
    """Lets :func:`_eos_ids` read a bare generation config (vLLM's path has no loaded model)."""

    def __init__(self, generation_config: Any) -> None:
        self.generation_config = generation_config


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


def _cache_kwarg(model: Any) -> str:
    """The forward() argument that takes the KV cache: ``cache`` in newer transformers, else ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
