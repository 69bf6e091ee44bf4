"""Faster decoding on a CPU, for the generation engine: oneDNN matmuls and single-query attention.

Profiled on a 2-core CPU with SmolLM2-135M at 64 rows and ~160 cached columns (see BENCHMARKS.md), a decode step
spends its time in places where PyTorch's default CPU kernels leave speed unused:

- **The linear layers.** ``F.linear`` runs on MKL's sgemm, which on this (AMD) machine reaches ~220 GFLOP/s at
  best and 155-185 on the model's projections at 64 rows (118 on the 576 x 49,152 LM head). oneDNN's matmul
  (``torch.ops.mkldnn._linear_pointwise``, the op torch's inductor compiles linear layers to) with the weight
  converted once to oneDNN's layout reaches ~450 GFLOP/s on this machine: at 64 rows it runs the projections
  1.3-2.2x faster and the LM head 2.7x, at 1,024 rows (prefill) ~2.1x. :func:`cpu_decoding` routes every plain
  fp32 ``nn.Linear`` with at least :data:`ONEDNN_MIN_OUT` outputs and :data:`ONEDNN_MIN_IN` inputs there, for
  inputs of at least :data:`ONEDNN_MIN_ROWS` rows (any row count for the LM head, ~3x faster even at one row;
  fewer rows stay on MKL, which is as fast or faster there). The converted weights are cached per layer (rebuilt
  when the weight changes, see :func:`_signature`) and cost one more copy of those weights in memory; they are
  not built when that copy would take more than :data:`ONEDNN_MEMORY_FRACTION` of the free memory. Results
  differ from MKL's by fp32 rounding (~1e-6 relative).
- **Attention for one new token.** ``scaled_dot_product_attention`` with a padding mask runs its generic CPU kernel
  at ~15 GB/s over a KV cache that this machine reads at ~70 GB/s. Two batched matmuls do better, and best in
  the orientation ``keys @ queries^T`` (the cache's rows are the long side, the few query heads of a KV group the
  short one): 27 ms vs 41 ms for 30 layers' attention in a step. :func:`decode_attention` is registered as a
  transformers attention backend that uses them for single-token queries and hands everything else (prefill,
  dropout, soft-capping, position biases) to transformers' own SDPA function.

:func:`cpu_decoding` switches these on for the duration of a ``with`` block and restores the model afterwards. It
does nothing on GPUs, leaves attention alone on models whose attention is not dispatched through transformers'
attention interface or that do not use SDPA, and leaves alone any layer that is not a plain fp32 ``nn.Linear``
(the frozen base layer inside a LoRA layer qualifies; low-rank adapter matrices under the size limits do not).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from weakref import WeakKeyDictionary

# Name under which decode_attention is registered with transformers' attention and mask interfaces.
BACKEND = "tunesec_cpu_decode"
# Linear layers run on oneDNN from this size (outputs, inputs) and this many input rows (the LM head: any).
ONEDNN_MIN_OUT = 128
ONEDNN_MIN_IN = 128
ONEDNN_MIN_ROWS = 16
# oneDNN copies of the weights are built only when they take at most this fraction of the free memory.
ONEDNN_MEMORY_FRACTION = 0.25
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


def onednn_forward(linear: Any, weight: Any, min_rows: int) -> Any:
    """A forward for the ``nn.Linear`` ``linear`` that runs on oneDNN with ``weight`` (its weight, converted)."""
    import torch
    import torch.nn.functional as F

    pointwise = pointwise_linear_op()

    def forward(x: Any) -> Any:
        if x.numel() // x.shape[-1] < min_rows or x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, linear.weight, linear.bias)
        if pointwise is not None:  # dense in, dense out: no layout conversion of the activations
            return pointwise(x, weight, linear.bias, "none", [], "")
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight, linear.bias).to_dense()

    return forward


@lru_cache(maxsize=1)
def pointwise_linear_op() -> Any:
    """``torch.ops.mkldnn._linear_pointwise`` (the op torch's inductor uses) if this torch has a working one."""
    import torch

    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if torch.equal(op(x, w.to_mkldnn(), None, "none", [], ""), torch.full((2, 4), 3.0)):
            return op
    except (AttributeError, RuntimeError):
        pass
    return None


# oneDNN copy of each converted layer's weight, with the weight's signature when it was made (keyed by layer:
# tensors cannot be dictionary keys, their == is elementwise)
_ONEDNN_WEIGHTS: WeakKeyDictionary[Any, tuple[tuple[int, int, float], Any]] = WeakKeyDictionary()
# elements of a weight summed into its signature
_SIGNATURE_SAMPLES = 4096


def _onednn_weights(linears: list[Any]) -> dict[Any, Any] | None:
    """The ``linears``' weights in oneDNN's layout (cached), or None when oneDNN is missing or memory is short."""
    import psutil
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    signatures = {m: _signature(m.weight) for m in linears}
    stale = [m for m in linears if m not in _ONEDNN_WEIGHTS or _ONEDNN_WEIGHTS[m][0] != signatures[m]]
    need = sum(m.weight.numel() * m.weight.element_size() for m in stale)
    if need > ONEDNN_MEMORY_FRACTION * psutil.virtual_memory().available:
        return None
    for m in stale:
        _ONEDNN_WEIGHTS[m] = (signatures[m], m.weight.detach().to_mkldnn())
    return {m: _ONEDNN_WEIGHTS[m][1] for m in linears}


def _signature(weight: Any) -> tuple[int, int, float]:
    """What tells a changed weight from the one a cached copy was made of.

    The version counter catches in-place updates (optimizer steps, edits under ``no_grad``) and the storage address
    a new tensor; a sum over a strided sample of the values catches writes through ``.data``, which bump no
    counter (PEFT's unsafe ``merge``, for one).
    """
    flat = weight.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SIGNATURE_SAMPLES)]
    return (weight._version, weight.data_ptr(), float(sample.double().sum()))


def _fast_linears(base: Any) -> list[tuple[Any, Any]]:
    """(module, forward) for each linear layer of ``base`` that a faster kernel serves (see the module docstring)."""
    import torch

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    plain = [
        m
        for m in base.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and "forward" not in vars(m)
    ]
    large = [m for m in plain if m.out_features >= ONEDNN_MIN_OUT and m.in_features >= ONEDNN_MIN_IN]
    onednn = _onednn_weights(large) if large else None
    if onednn is None:
        return []
    return [(m, onednn_forward(m, w, 1 if m is head else ONEDNN_MIN_ROWS)) for m, w in onednn.items()]


@contextmanager
def cpu_decoding(model: Any) -> Iterator[None]:
    """Within the block, ``model`` decodes with the kernels of this module (CPU only; see the module docstring).

    Each part applies only where it is safe (see the module docstring); the model is restored on exit, also when
    the block raises. Nested or concurrent blocks on one model are harmless: an inner block finds the model
    switched and leaves it alone, and whichever block ends first restores the plain kernels, which compute the
    same attention and logits up to fp32 rounding.
    """
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
    linears = _fast_linears(base)
    if swap_attention:
        _register()
        config._attn_implementation = BACKEND
    for module, forward in linears:
        module.forward = forward
    try:
        yield
    finally:
        # undo only what is still ours (another block on the same model may have restored it already)
        if swap_attention and config._attn_implementation == BACKEND:
            config._attn_implementation = "sdpa"
        for module, forward in linears:
            if vars(module).get("forward") is forward:
                del module.forward


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
