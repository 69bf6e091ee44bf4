"""Faster kernels on a CPU, for the generation engine and the training engine: oneDNN matmuls and attention.

Profiled on a 2-core CPU with SmolLM2-135M (see BENCHMARKS.md), decoding and LoRA training spend their time in
places where PyTorch's default CPU kernels leave speed unused:

- **The linear layers.** ``F.linear`` runs on MKL's sgemm, which on this (AMD) machine reaches ~220 GFLOP/s at
  best and 155-185 on the model's projections at 64 rows (118 on the 576 x 49,152 LM head). oneDNN's matmul
  (``torch.ops.mkldnn._linear_pointwise``, the op torch's inductor compiles linear layers to) with the weight
  converted once to oneDNN's layout reaches ~450 GFLOP/s on this machine: at 64 rows it runs the projections
  1.3-2.2x faster and the LM head 2.7x, at 500-1,024 rows (prefill, a training batch) ~2.2x. :func:`cpu_inference`
  and :func:`cpu_training` route every plain fp32 ``nn.Linear`` with at least :data:`ONEDNN_MIN_OUT` outputs and
  :data:`ONEDNN_MIN_IN` inputs there, for inputs of at least :data:`ONEDNN_MIN_ROWS` rows (any row count for the
  LM head, ~3x faster even at one row; fewer rows stay on MKL, which is as fast or faster there). In training,
  the frozen layers (the base layers under LoRA, the LM head) run their forward and the gradient of their input
  on oneDNN, with a second copy of the weight transposed; the trained layers (LoRA's matrices, of any size, or
  every layer of a full fine-tune) convert their weight at each call, and their weight gradient takes the fastest
  product for its shape. The frozen layers' converted weights are cached per layer (rebuilt when the weight
  changes, see :func:`_signature`) and cost one more copy of those weights in memory (two in training); they are
  not built when that would take more than :data:`ONEDNN_MEMORY_FRACTION` of the free memory. Results differ
  from MKL's by fp32 rounding (~1e-6 relative).
- **Attention for one new token.** ``scaled_dot_product_attention`` with a padding mask runs its generic CPU kernel
  at ~15 GB/s over a KV cache that this machine reads at ~70 GB/s. Two batched matmuls do better, and best in
  the orientation ``keys @ queries^T`` (the cache's rows are the long side, the few query heads of a KV group the
  short one): 27 ms vs 41 ms for 30 layers' attention in a step.
- **Attention over packed sequences.** The training engine packs a micro-batch into one row (padding-free) and
  transformers masks it block-diagonally, so SDPA computes and differentiates the attention of every token to
  every other token of the row and masks most of it away: with 8 examples of ~110 tokens, 8x the work needed.
  Each example's own causal attention, one SDPA call per example, gives the same result 5x faster (forward and
  backward).

:func:`cpu_attention` does both: it is registered as a transformers attention backend, used only inside the
blocks, and hands everything else (prefill of padded batches, soft-capping, position biases, a mask it does not
recognise) to transformers' own SDPA function.

:func:`cpu_inference` and :func:`cpu_training` switch these on for the duration of a ``with`` block and restore the
model afterwards. They do nothing on GPUs, leave attention alone on models whose attention is not dispatched
through transformers' attention interface or that do not use SDPA, and leave alone any layer that is not a plain
fp32 ``nn.Linear`` (the frozen base layer inside a LoRA layer qualifies; low-rank adapter matrices under the size
limits do not).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from weakref import WeakKeyDictionary

# Name under which cpu_attention is registered with transformers' attention and mask interfaces.
BACKEND = "tunesec_cpu"
# Linear layers run on oneDNN from this size (outputs, inputs) and this many input rows (the LM head: any).
ONEDNN_MIN_OUT = 128
ONEDNN_MIN_IN = 128
ONEDNN_MIN_ROWS = 16
# oneDNN copies of the weights are built only when they take at most this fraction of the free memory.
ONEDNN_MEMORY_FRACTION = 0.25
# Keyword arguments that change SDPA's result when set: attention with any of them goes to SDPA itself.
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


def cpu_attention(
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
    """Attention with transformers' backend signature: single-token queries and packed rows take faster paths.

    Shapes as in transformers: ``query`` is ``(batch, heads, q_len, dim)``, ``key``/``value`` are
    ``(batch, kv_heads, kv_len, dim)``, ``attention_mask`` is a boolean (True = attend) or additive mask of shape
    ``(batch or 1, 1 or heads, q_len, >= kv_len)`` or None. Returns ``(batch, q_len, heads, dim)`` as SDPA does.
    """
    sdpa = _sdpa_forward()
    plain = query.device.type == "cpu" and not kwargs.get("output_attentions")
    plain = plain and all(kwargs.get(k) is None for k in _SDPA_ONLY)
    if plain and query.shape[2] == 1 and dropout == 0.0:
        out = _decode_attention(query, key, value, attention_mask, scaling)
        if out is not None:
            return out, None
    segments = _packed_segments(query, key, attention_mask, kwargs.get("position_ids")) if plain else None
    if segments is None:
        return sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    import torch

    # each example of the packed row attends causally to itself only: exactly the block-diagonal mask's result
    parts = [
        sdpa(
            module,
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
            **kwargs,
        )[0]
        for a, b in segments
    ]
    return torch.cat(parts, dim=1), None


def _decode_attention(query: Any, key: Any, value: Any, mask: Any, scaling: float | None) -> Any:
    """One query token per row as ``keys @ queries^T`` and ``probs @ values``; None if the shapes do not fit."""
    import torch

    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads or not (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)):
        return None
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
    return out.reshape(batch, 1, heads, value.shape[-1])


# The last mask recognised as packed examples, and their (start, end) spans: every layer of a forward pass gets
# the same mask object, so the check runs once per pass.
_LAST_PACKED: tuple[Any, Any, list[tuple[int, int]]] | None = None


def _packed_segments(query: Any, key: Any, mask: Any, positions: Any) -> list[tuple[int, int]] | None:
    """The examples of a packed row as (start, end) spans, if ``mask`` is exactly their block-diagonal causal mask.

    A packed row is one row of several examples whose position ids restart at 0 (the training engine's
    padding-free batches); transformers gives it a boolean mask in which each token attends to the tokens of its
    own example up to itself. Anything else (several rows, a KV cache, sliding windows, padding) returns None.
    """
    global _LAST_PACKED
    import torch

    n = query.shape[2]
    if (
        query.shape[0] != 1
        or key.shape[2] != n
        or n < 2
        or mask is None
        or mask.dtype != torch.bool
        or tuple(mask.shape) != (1, 1, n, n)
        or positions is None
        or tuple(positions.shape) != (1, n)
    ):
        return None
    last = _LAST_PACKED
    if last is not None and last[0]() is mask and last[1]() is positions:
        return last[2]
    pos = positions[0]
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    bounds = [*starts.tolist(), n]
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:], strict=False)], device=pos.device)
    example = torch.repeat_interleave(torch.arange(len(lengths), device=pos.device), lengths)
    offsets = torch.repeat_interleave(starts, lengths)
    if not torch.equal(pos, torch.arange(n, device=pos.device) - offsets):
        return None
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(mask[0, 0], causal & (example[:, None] == example[None, :]).to(mask.device)):
        return None
    spans = list(zip(bounds, bounds[1:], strict=False))
    _LAST_PACKED = (weakref.ref(mask), weakref.ref(positions), spans)
    return spans


class OneDNNWeight:
    """oneDNN copies of a linear layer's weight: ``forward`` (W) and, for training, ``transposed`` (W^T).

    ``signature`` is the weight's :func:`_signature` when the copies were made.
    """

    signature: tuple[int, int, float]
    forward: Any
    transposed: Any

    def __init__(self, weight: Any, transposed: bool) -> None:
        self._build(weight, transposed)

    def _build(self, weight: Any, transposed: bool) -> None:
        self.signature = _signature(weight)
        data = weight.detach()
        self.forward = data.to_mkldnn()
        self.transposed = data.t().contiguous().to_mkldnn() if transposed else None

    def current(self, weight: Any, transposed: bool = False) -> bool:
        """Whether these copies were made of ``weight`` as it is now (and include ``transposed`` if asked)."""
        return self.signature == _signature(weight) and (self.transposed is not None or not transposed)

    def refresh(self, weight: Any) -> OneDNNWeight:
        """These copies, remade first if ``weight`` has changed since they were made."""
        if not self.current(weight):
            self._build(weight, self.transposed is not None)
        return self


def _onednn_matmul(x: Any, weight: Any, bias: Any) -> Any:
    """``x @ W^T + bias`` with ``weight`` a oneDNN copy of ``W``."""
    pointwise = pointwise_linear_op()
    if pointwise is not None:  # dense in, dense out: no layout conversion of the activations
        return pointwise(x, weight, bias, "none", [], "")
    import torch

    return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight, bias).to_dense()


@lru_cache(maxsize=1)
def _frozen_linear() -> Any:
    """An autograd function: a frozen linear layer on oneDNN, whose input gradient also runs on oneDNN."""
    import torch

    class FrozenLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, copies: OneDNNWeight, bias: Any) -> Any:
            ctx.transposed = copies.transposed
            ctx.save_for_backward(weight)
            return _onednn_matmul(x, copies.forward, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (weight,) = ctx.saved_tensors
            if torch.is_grad_enabled() or ctx.transposed is None:  # a differentiable gradient (create_graph)
                return grad.matmul(weight), None, None, None
            return _onednn_matmul(grad.contiguous(), ctx.transposed, None), None, None, None

    return FrozenLinear


@lru_cache(maxsize=1)
def _trained_linear() -> Any:
    """An autograd function: a trained linear layer on oneDNN (weights converted at each call, as they change).

    The weight gradient takes the fastest product for its shape (measured on the target CPU): oneDNN when both
    sides have at least :data:`ONEDNN_MIN_OUT` features, else MKL in the orientation whose result has the few
    rows (a LoRA matrix: ``g^T x`` for ``A``, ``(x^T g)^T`` for ``B``; 1.1 vs 0.35 ms at 880 rows for B).
    """
    import torch

    class TrainedLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> Any:
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return _onednn_matmul(x, weight.detach().to_mkldnn(), bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x, weight = ctx.saved_tensors
            out_features, in_features = weight.shape
            g = grad.reshape(-1, out_features)
            rows = x.reshape(-1, in_features)
            want_x, want_w, want_b = ctx.needs_input_grad
            grad_b = g.sum(0) if want_b and ctx.has_bias else None
            if torch.is_grad_enabled():  # a differentiable gradient (create_graph): the plain products
                grad_x = grad.matmul(weight) if want_x else None
                return grad_x, (g.t().matmul(rows) if want_w else None), grad_b
            g = g.contiguous()
            grad_x = None
            if want_x:
                grad_x = _onednn_matmul(g, weight.detach().t().contiguous().to_mkldnn(), None).reshape(x.shape)
            grad_w = None
            if want_w:
                if min(out_features, in_features) >= ONEDNN_MIN_OUT:
                    grad_w = _onednn_matmul(g.t().contiguous(), rows.t().contiguous().to_mkldnn(), None)
                elif out_features <= in_features:
                    grad_w = g.t().matmul(rows)
                else:
                    grad_w = rows.t().matmul(g).t().contiguous()
            return grad_x, grad_w, grad_b

    return TrainedLinear


def trained_forward(linear: Any, min_rows: int) -> Any:
    """A forward for the trained ``nn.Linear`` ``linear`` (a LoRA matrix, a fully fine-tuned layer) on oneDNN.

    Inputs under ``min_rows`` rows, or not fp32, take ``F.linear``; so does a layer whose weight is no longer fp32.
    """
    import torch
    import torch.nn.functional as F

    def forward(x: Any) -> Any:
        weight = linear.weight
        if x.numel() // x.shape[-1] < min_rows or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return F.linear(x, weight, linear.bias)
        return _trained_linear().apply(x, weight, linear.bias)

    return forward


def onednn_forward(linear: Any, copies: OneDNNWeight, min_rows: int, *, training: bool = False) -> Any:
    """A forward for the ``nn.Linear`` ``linear`` that runs on oneDNN with ``copies`` of its weight.

    With ``training``, the copies are checked against the weight at each call (remade if it changed) and a frozen
    layer's input gradient runs on oneDNN too; otherwise the copies are taken as current (the weights do not
    change while the engine generates) and anything that needs a gradient runs ``F.linear``.
    """
    import torch
    import torch.nn.functional as F

    def forward(x: Any) -> Any:
        weight, bias = linear.weight, linear.bias
        if x.numel() // x.shape[-1] < min_rows or x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        grad = torch.is_grad_enabled()
        if grad and (not training or weight.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, weight, bias)
        current = copies.refresh(weight) if training else copies
        if grad and x.requires_grad:
            return _frozen_linear().apply(x, weight, current, bias)
        return _onednn_matmul(x, current.forward, bias)

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


# oneDNN copies of each converted layer's weight (keyed by layer: tensors cannot be dictionary keys, their == is
# elementwise)
_ONEDNN_WEIGHTS: WeakKeyDictionary[Any, OneDNNWeight] = WeakKeyDictionary()
# elements of a weight summed into its signature
_SIGNATURE_SAMPLES = 4096


def _onednn_weights(linears: list[Any], transposed: bool = False, reserve: int = 0) -> dict[Any, OneDNNWeight] | None:
    """The ``linears``' weights in oneDNN's layout (cached), or None when oneDNN is missing or memory is short.

    With ``transposed``, each also has the transposed copy that the input gradient needs. ``reserve`` bytes of the
    free memory are left out of the budget (what training itself is about to need).
    """
    import psutil
    import torch

    if not torch.backends.mkldnn.is_available():
        return None

    stale = [m for m in linears if m not in _ONEDNN_WEIGHTS or not _ONEDNN_WEIGHTS[m].current(m.weight, transposed)]
    need = sum(m.weight.numel() * m.weight.element_size() for m in stale) * (2 if transposed else 1)
    if need > ONEDNN_MEMORY_FRACTION * (psutil.virtual_memory().available - reserve):
        return None
    for m in stale:
        _ONEDNN_WEIGHTS[m] = OneDNNWeight(m.weight, transposed)
    return {m: _ONEDNN_WEIGHTS[m] for m in linears}


def _signature(weight: Any) -> tuple[int, int, float]:
    """What tells a changed weight from the one a cached copy was made of.

    The version counter catches in-place updates (optimizer steps, edits under ``no_grad``) and the storage address
    a new tensor; a sum over a strided sample of the values catches writes through ``.data``, which bump no
    counter (PEFT's unsafe ``merge``, for one).
    """
    flat = weight.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SIGNATURE_SAMPLES)]
    return (weight._version, weight.data_ptr(), float(sample.double().sum()))


def _fast_linears(base: Any, training: bool = False, reserve: int = 0) -> list[tuple[Any, Any]]:
    """(module, forward) for each linear layer of ``base`` that a faster kernel serves (see the module docstring)."""
    import torch

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    plain = [
        m
        for m in base.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and "forward" not in vars(m)
    ]
    large = [m for m in plain if m.out_features >= ONEDNN_MIN_OUT and m.in_features >= ONEDNN_MIN_IN]
    trained: list[tuple[Any, Any]] = []
    if training:  # trained layers (any size: LoRA's matrices) convert their weight at each call
        if torch.backends.mkldnn.is_available() and pointwise_linear_op() is not None:
            trained = [(m, trained_forward(m, ONEDNN_MIN_ROWS)) for m in plain if m.weight.requires_grad]
        large = [m for m in large if not m.weight.requires_grad]  # frozen ones get cached copies
    onednn = _onednn_weights(large, transposed=training, reserve=reserve) if large else None
    if onednn is None:
        return trained
    frozen = [
        (m, onednn_forward(m, w, 1 if m is head else ONEDNN_MIN_ROWS, training=training)) for m, w in onednn.items()
    ]
    return frozen + trained


@contextmanager
def cpu_inference(model: Any) -> Iterator[None]:
    """Within the block, ``model`` runs inference (generation, scoring, embedding) with the kernels of this module.

    CPU only; see the module docstring.

    Each part applies only where it is safe (see the module docstring); the model is restored on exit, also when
    the block raises. Nested or concurrent blocks on one model are harmless: an inner block finds the model
    switched and leaves it alone, and whichever block ends first restores the plain kernels, which compute the
    same attention and logits up to fp32 rounding.
    """
    with _switched(model, training=False):
        yield


@contextmanager
def cpu_training(model: Any, reserve: int = 0) -> Iterator[None]:
    """Within the block, ``model`` trains with the kernels of this module (CPU only; see the module docstring).

    As :func:`cpu_inference`, and the frozen linear layers also compute their input gradient on oneDNN. Weights may
    change inside the block (the optimizer, a hook's perturbation): each call checks its layer's copies. The
    copies' memory budget leaves out ``reserve`` bytes (the training's own estimated need).
    """
    with _switched(model, training=True, reserve=reserve):
        yield


@contextmanager
def _switched(model: Any, training: bool, reserve: int = 0) -> Iterator[None]:
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
    linears = _fast_linears(base, training, reserve)
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
            copies = _ONEDNN_WEIGHTS.get(module)
            if training and copies is not None:  # the transposed copies serve gradients only: free them
                copies.transposed = None


@lru_cache(maxsize=1)
def _sdpa_forward() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@lru_cache(maxsize=1)
def _register() -> None:
    """Register :func:`cpu_attention` (with SDPA's mask builder) under :data:`BACKEND`, once per process."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(BACKEND, cpu_attention)
    AttentionMaskInterface.register(BACKEND, sdpa_mask)
