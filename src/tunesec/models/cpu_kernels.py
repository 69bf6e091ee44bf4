"""Faster decoding steps on a CPU, for the generation engine: single-query attention and a split LM head.

Profiled on a 2-core CPU with SmolLM2-135M at 64 rows and ~160 cached columns (see BENCHMARKS.md), a decode step
spends its time in two places where PyTorch's default kernels leave speed unused:

- **Attention for one new token.** ``scaled_dot_product_attention`` with a padding mask runs its generic CPU kernel
  at ~15 GB/s over a KV cache that this machine reads at ~70 GB/s. Two batched matmuls do better, and best in
  the orientation ``keys @ queries^T`` (the cache's rows are the long side, the few query heads of a KV group the
  short one): 27 ms vs 41 ms for 30 layers' attention in a step. :func:`decode_attention` is registered as a
  transformers attention backend that uses them for single-token queries and hands everything else (prefill,
  dropout, soft-capping, position biases) to transformers' own SDPA function.
- **The LM head.** A 576 x 49,152 projection at 64 rows runs at about half the matmul rate of the model's other
  projections; split into blocks of :data:`HEAD_BLOCK` output rows it runs ~20% faster. The blocks' logits are
  bit-identical to the unsplit product (each output is the same dot product).

:func:`cpu_decoding` switches both on for the duration of a ``with`` block and restores the model afterwards. It
does nothing on GPUs, on models whose attention is not dispatched through transformers' attention interface, on
models that do not use SDPA, and on heads that are not a plain ``nn.Linear`` (a LoRA-wrapped head, for one).
Greedy outputs are unchanged in the engine's benchmark (64 of 64 identical); attention logits differ from SDPA's
by fp32 rounding (~5e-7).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

# Name under which decode_attention is registered with transformers' attention and mask interfaces.
BACKEND = "tunesec_cpu_decode"
# Output rows of the LM head computed per matmul, and the smallest head (vocabulary) and batch worth splitting.
HEAD_BLOCK = 768
HEAD_MIN_VOCAB = 8192
HEAD_MIN_ROWS = 8
# Keyword arguments that change SDPA's result when set: attention with any of them goes to SDPA itself.
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


def decode_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention with transformers' backend signature; single-token queries take two batched matmuls.

    Shapes as in transformers: ``query`` is ``(batch, heads, q_len, dim)``, ``key``/``value`` are
    ``(batch, kv_heads, kv_len, dim)``, ``attention_mask`` is a boolean (True = attend) or additive mask of shape
    ``(batch or 1, 1 or heads, q_len, >= kv_len)`` or None. Returns ``(batch, q_len, heads, dim)`` as SDPA does.
    """
    import torch

    sdpa = _sdpa_forward()
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    mask = attention_mask
    simple = (
        q_len == 1
        and query.device.type == "cpu"
        and dropout == 0.0
        and heads % kv_heads == 0
        and not kwargs.get("output_attentions")
        and all(kwargs.get(k) is None for k in _SDPA_ONLY)
        and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1))
    )
    if not simple:
        return sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    group = heads // kv_heads
    kv_len = key.shape[-2]
    scale = scaling if scaling is not None else dim**-0.5
    # (batch, kv_heads, dim, group): the queries of a KV group as columns, so the long side is the cache's rows
    queries = (query.reshape(batch, kv_heads, group, dim) * scale).transpose(-1, -2)
    scores = torch.matmul(key, queries)  # (batch, kv_heads, kv_len, group)
    if mask is not None:
        column = mask[:, :, 0, :kv_len].reshape(mask.shape[0], 1, kv_len, 1)
        if column.dtype == torch.bool:
            scores = scores.masked_fill_(~column, float("-inf"))
        else:
            scores = scores + column
    probs = scores.transpose(-1, -2).softmax(dim=-1)  # (batch, kv_heads, group, kv_len)
    out = torch.matmul(probs.to(value.dtype), value)  # (batch, kv_heads, group, dim)
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def split_head_forward(head: Any) -> Any:
    """A forward for the ``nn.Linear`` ``head`` that computes its outputs in blocks of :data:`HEAD_BLOCK` rows."""
    import torch
    import torch.nn.functional as F

    def forward(x: Any) -> Any:
        weight, bias = head.weight, head.bias
        if x.numel() // x.shape[-1] < HEAD_MIN_ROWS:
            return F.linear(x, weight, bias)
        biases = bias.split(HEAD_BLOCK) if bias is not None else [None] * -(-weight.shape[0] // HEAD_BLOCK)
        return torch.cat([F.linear(x, w, b) for w, b in zip(weight.split(HEAD_BLOCK), biases, strict=True)], dim=-1)

    return forward


@contextmanager
def cpu_decoding(model: Any) -> Iterator[None]:
    """Within the block, ``model`` decodes with :func:`decode_attention` and a split LM head (CPU only).

    Each part applies only where it is safe (see the module docstring); the model is restored on exit, also when
    the block raises. Nested or concurrent blocks on one model are harmless: an inner block finds the model
    switched and leaves it alone, and whichever block ends first restores the plain kernels, which compute the
    same attention and logits.
    """
    import torch

    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        yield
        return
    config: Any = getattr(model, "config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    swap_attention = bool(
        config is not None
        and getattr(base, "_supports_attention_backend", False)
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not getattr(config, "sub_configs", None)
    )
    head: Any = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    split_head = bool(
        type(head) is torch.nn.Linear and head.out_features >= HEAD_MIN_VOCAB and "forward" not in vars(head)
    )
    forward = split_head_forward(head) if split_head else None
    if swap_attention:
        _register()
        config._attn_implementation = BACKEND
    if forward is not None:
        head.forward = forward
    try:
        yield
    finally:
        # undo only what is still ours (another block on the same model may have restored it already)
        if swap_attention and config._attn_implementation == BACKEND:
            config._attn_implementation = "sdpa"
        if forward is not None and vars(head).get("forward") is forward:
            del head.forward


@lru_cache(maxsize=1)
def _sdpa_forward() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@lru_cache(maxsize=1)
def _register() -> None:
    """Register :func:`decode_attention` (with SDPA's mask builder) under :data:`BACKEND`, once per process."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(BACKEND, decode_attention)
    AttentionMaskInterface.register(BACKEND, sdpa_mask)
