"""CPU decoding kernels: same attention and logits as transformers' SDPA path, and the model restored after."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tunesec.models.cpu_kernels as kernels
from tiny import make_model, make_tokenizer
from tunesec.models import GenerationConfig
from tunesec.models.generation import HFGenerator
from tunesec.models.loading import LoadedModel
from tunesec.models.ref import ModelRef
from tunesec.training import TrainingHook


class _Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, dim: int = 16) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, heads, q_len, dim, generator=g),
        torch.randn(batch, kv_heads, kv_len, dim, generator=g),
        torch.randn(batch, kv_heads, kv_len, dim, generator=g),
    )


def _padding_mask(batch: int, q_len: int, width: int) -> Any:
    """A boolean mask as transformers' sdpa_mask builds it: left padding on some rows, extra columns on the right."""
    mask = torch.ones(batch, 1, q_len, width, dtype=torch.bool)
    mask[0, ..., :3] = False
    mask[2, ..., :5] = False
    return mask


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_cpu_attention_matches_sdpa(heads: int, kv_heads: int, mask_kind: str) -> None:
    batch, kv_len = 4, 11
    q, k, v = _qkv(batch, heads, kv_heads, 1, kv_len)
    mask: Any = None
    if mask_kind != "none":
        mask = _padding_mask(batch, 1, kv_len + 2)  # masks may be wider than the cache; only kv_len columns count
        if mask_kind == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _Attn(heads // kv_heads)
    for scaling in (None, 0.3):
        got, _ = kernels.cpu_attention(module, q, k, v, mask, scaling=scaling)
        ref_mask = mask[..., :kv_len] if mask is not None else None
        want, _ = sdpa_attention_forward(module, q, k, v, ref_mask, scaling=scaling)
        assert got.shape == want.shape == (batch, 1, heads, 16)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_cpu_attention_hands_other_cases_to_sdpa() -> None:
    module = _Attn(2)
    q, k, v = _qkv(3, 4, 2, 5, 5)  # a prefill: five query tokens
    got, _ = kernels.cpu_attention(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(got, want)
    q1, k1, v1 = _qkv(3, 4, 2, 1, 5)
    with pytest.raises(ValueError, match="softcap"):  # SDPA's own refusal, not a silently wrong result
        kernels.cpu_attention(module, q1, k1, v1, None, softcap=30.0)


def _loaded() -> LoadedModel:
    tok = make_tokenizer()
    tok.padding_side = "left"
    return LoadedModel(ref=ModelRef(base="tiny-llama"), model=make_model(tok, arch="llama"), tokenizer=tok)


def _all_on_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds low enough for the tiny model's layers (64-400 features) to run on oneDNN."""
    monkeypatch.setattr(kernels, "ONEDNN_MIN_OUT", 1)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_IN", 1)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_ROWS", 1)


def test_cpu_inference_switches_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    _all_on_onednn(monkeypatch)
    model = _loaded().model
    head = model.get_output_embeddings()
    assert model.config._attn_implementation == "sdpa"
    with kernels.cpu_inference(model):
        assert model.config._attn_implementation == kernels.BACKEND
        assert "forward" in vars(head)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(head)
    with pytest.raises(RuntimeError, match="boom"), kernels.cpu_inference(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(head)
    model.config._attn_implementation = "eager"  # a user's choice of kernel is left alone
    with kernels.cpu_inference(model):
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("pointwise", [True, False])
def test_onednn_forward_matches_linear(pointwise: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pointwise:  # a torch without the inductor op: oneDNN's public linear, with layout conversions
        monkeypatch.setattr(kernels, "pointwise_linear_op", lambda: None)
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    weight = kernels._onednn_weights([linear])[linear]
    forward = kernels.onednn_forward(linear, weight, min_rows=4)
    x = torch.randn(5, 3, 48)
    with torch.inference_mode():
        torch.testing.assert_close(forward(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
        assert forward(x[:1, :2]).shape == (1, 2, 80)  # under min_rows: MKL
    y = forward(x)  # with autograd on, the plain layer (oneDNN's copy has no gradient)
    assert y.requires_grad


def test_onednn_weights_are_cached_until_the_weight_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    linear = torch.nn.Linear(32, 64)
    first = kernels._onednn_weights([linear])[linear]
    assert kernels._onednn_weights([linear])[linear] is first
    with torch.no_grad():
        linear.weight.add_(1.0)
    second = kernels._onednn_weights([linear])[linear]
    assert second is not first
    torch.testing.assert_close(second.forward.to_dense(), linear.weight.detach())
    linear.weight.data.mul_(0.5)  # through .data: no version bump, same storage (as PEFT's unsafe merge writes)
    third = kernels._onednn_weights([linear])[linear]
    assert third is not second
    torch.testing.assert_close(third.forward.to_dense(), linear.weight.detach())
    import psutil

    # the memory training is about to need is left out of the budget
    assert kernels._onednn_weights([torch.nn.Linear(32, 64)], reserve=psutil.virtual_memory().available) is None
    monkeypatch.setattr(kernels, "ONEDNN_MEMORY_FRACTION", 0.0)  # no room for a copy: no oneDNN
    assert kernels._onednn_weights([torch.nn.Linear(32, 64)]) is None


def test_without_room_for_onednn_the_layers_stay_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    _all_on_onednn(monkeypatch)
    model = _loaded().model
    linears = dict(kernels._fast_linears(model))
    assert len(linears) == sum(type(m) is torch.nn.Linear for m in model.modules())
    assert len(kernels._fast_linears(model)) == len(linears)  # already converted: no new memory needed
    monkeypatch.setattr(kernels, "ONEDNN_MEMORY_FRACTION", 0.0)
    other = _loaded().model
    assert kernels._fast_linears(other) == []


@pytest.mark.parametrize("onednn", [False, True])
def test_engine_output_unchanged_by_the_kernels(onednn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.models.generation as generation

    if onednn:
        _all_on_onednn(monkeypatch)
    else:
        monkeypatch.setattr(kernels, "ONEDNN_MEMORY_FRACTION", 0.0)
    calls = {"decode": 0, "linear": 0}
    real = kernels.cpu_attention
    real_onednn = kernels.onednn_forward

    def spy(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        calls["decode"] += query.shape[2] == 1
        return real(module, query, *args, **kwargs)

    def spy_onednn(*args: Any, **kwargs: Any) -> Any:
        forward = real_onednn(*args, **kwargs)

        def counted(x: Any) -> Any:
            calls["linear"] += 1
            return forward(x)

        return counted

    monkeypatch.setattr(kernels, "cpu_attention", spy)
    monkeypatch.setattr(kernels, "onednn_forward", spy_onednn)
    kernels._register.cache_clear()
    lm = _loaded()
    engine = HFGenerator(lm)
    prompts = ["hello", "Write a poem about the sea and the sky.", "What is the capital of France?", "0 1 2 3"]
    cfg = GenerationConfig(max_new_tokens=16, batch_size=3)
    try:
        fast = [g.text for g in engine.generate(prompts, cfg, progress=False)]
    finally:
        monkeypatch.undo()
        kernels._register.cache_clear()
    assert calls["decode"] > 0
    assert (calls["linear"] > 0) == onednn
    monkeypatch.setattr(generation, "cpu_inference", lambda model: contextlib.nullcontext())
    plain = [g.text for g in engine.generate(prompts, cfg, progress=False)]
    assert fast == plain


def test_nested_blocks_leave_the_model_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    _all_on_onednn(monkeypatch)
    model = _loaded().model
    head = model.get_output_embeddings()
    outer = kernels.cpu_inference(model)
    outer.__enter__()
    with kernels.cpu_inference(model):  # finds the model switched: changes nothing
        assert model.config._attn_implementation == kernels.BACKEND
    assert model.config._attn_implementation == kernels.BACKEND and "forward" in vars(head)
    outer.__exit__(None, None, None)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(head)


# -- training: packed attention, frozen linear layers on oneDNN ---------------------------------------------------


def _packed(lengths: list[int]) -> tuple[Any, Any]:
    """Position ids of examples packed into one row, and their block-diagonal causal mask as transformers builds it."""
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = sum(lengths)
    mask = torch.ones(n, n, dtype=torch.bool).tril() & (example[:, None] == example[None, :])
    return positions, mask[None, None]


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4)])
def test_packed_attention_matches_block_diagonal_sdpa(heads: int, kv_heads: int) -> None:
    lengths = [3, 5, 1, 4]
    positions, mask = _packed(lengths)
    module = _Attn(heads // kv_heads)
    q, k, v = (t.requires_grad_() for t in _qkv(1, heads, kv_heads, sum(lengths), sum(lengths)))
    assert kernels._packed_segments(q, k, mask, positions) == [(0, 3), (3, 8), (8, 9), (9, 13)]
    got, _ = kernels.cpu_attention(module, q, k, v, mask, scaling=0.3, position_ids=positions)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_only_an_exact_packed_mask_takes_the_packed_path() -> None:
    lengths = [3, 5, 4]
    n = sum(lengths)
    positions, mask = _packed(lengths)
    q, k, _ = _qkv(1, 4, 2, n, n)
    assert kernels._packed_segments(q, k, mask, positions) is not None
    window = mask & torch.ones(n, n, dtype=torch.bool).triu(-2)  # a sliding window inside each example
    assert kernels._packed_segments(q, k, window, positions) is None
    padded = mask.clone()
    padded[..., 3] = False  # a padding token
    assert kernels._packed_segments(q, k, padded, positions) is None
    assert kernels._packed_segments(q, k, None, positions) is None  # no mask: causal over the whole row
    assert kernels._packed_segments(q, k, mask, None) is None
    shifted = positions.clone()
    shifted[0, 4] = 7  # positions that do not count up within an example
    assert kernels._packed_segments(q, k, mask, shifted) is None
    one = torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # a single example
    assert kernels._packed_segments(q, k, one, torch.arange(n)[None]) is None
    q2, k2, _ = _qkv(2, 4, 2, n, n)
    assert kernels._packed_segments(q2, k2, mask.expand(2, 1, n, n), positions.expand(2, n)) is None


def test_frozen_linear_forward_and_input_gradient_on_onednn() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80).requires_grad_(False)
    copies = kernels._onednn_weights([linear], transposed=True)[linear]
    assert copies.transposed is not None
    forward = kernels.onednn_forward(linear, copies, min_rows=1, training=True)
    x = torch.randn(2, 5, 48, requires_grad=True)
    got = forward(x)
    (grad,) = torch.autograd.grad(got.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    want = F.linear(x2, linear.weight, linear.bias)
    (want_grad,) = torch.autograd.grad(want.sum(), x2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)
    # a second-order gradient (create_graph) goes through the plain product
    (g1,) = torch.autograd.grad(forward(x).square().sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), x)
    (w1,) = torch.autograd.grad(F.linear(x2, linear.weight, linear.bias).square().sum(), x2, create_graph=True)
    (w2,) = torch.autograd.grad(w1.sum(), x2)
    torch.testing.assert_close(g2, w2, atol=1e-4, rtol=1e-4)
    # a trained layer keeps F.linear and gets its weight gradient
    linear.weight.requires_grad_(True)
    forward(x).sum().backward()
    assert linear.weight.grad is not None


@pytest.mark.parametrize(("out_features", "in_features"), [(8, 48), (48, 8), (160, 144)])
def test_trained_linear_gradients_match_linear(out_features: int, in_features: int) -> None:
    """LoRA's A (few outputs) and B (few inputs), and a layer large enough for oneDNN's weight gradient."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    forward = kernels.trained_forward(linear, min_rows=1)
    x = torch.randn(3, 7, in_features, requires_grad=True)
    params = (x, linear.weight, linear.bias)
    got = forward(x)
    grads = torch.autograd.grad(got.square().sum(), params)
    want = F.linear(x, linear.weight, linear.bias)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # second order (create_graph): the plain products
    (g1,) = torch.autograd.grad(forward(x).square().sum(), linear.weight, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), x)
    (w1,) = torch.autograd.grad(
        F.linear(x, linear.weight, linear.bias).square().sum(), linear.weight, create_graph=True
    )
    (w2,) = torch.autograd.grad(w1.sum(), x)
    torch.testing.assert_close(g2, w2, atol=1e-4, rtol=1e-4)


def test_training_copies_follow_weight_changes() -> None:
    linear = torch.nn.Linear(32, 64).requires_grad_(False)
    copies = kernels._onednn_weights([linear], transposed=True)[linear]
    forward = kernels.onednn_forward(linear, copies, min_rows=1, training=True)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.no_grad():
        linear.weight.mul_(-2.0)  # a hook's perturbation of a frozen weight
    torch.testing.assert_close(forward(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(forward(x).sum(), x)
    torch.testing.assert_close(grad, linear.weight.sum(0).expand(4, 32), atol=1e-5, rtol=1e-5)


class FrozenNoise(TrainingHook):
    """Perturbs every frozen weight around each micro-batch (Booster/Vaccine-style) and restores it after."""

    def before_step(self, model: Any, inputs: Any) -> None:
        self.saved = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    self.saved[n] = p.detach().clone()
                    p.add_(0.05 * torch.sign(p))

    def after_step(self, model: Any) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.saved:
                    p.copy_(self.saved[n])


@pytest.mark.parametrize(("method", "perturb"), [("lora", False), ("lora", True), ("full", False)])
def test_training_matches_plain_kernels(
    method: str, perturb: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's run with the CPU kernels (every tiny layer on oneDNN, packed attention) as without.

    With ``perturb``, a hook changes the frozen weights (whose oneDNN copies are cached) before each micro-batch.
    """
    import tunesec.training.engine as engine
    from test_training_fixtures import make_loaded, memorise_set
    from tunesec.training import TrainConfig, train

    _all_on_onednn(monkeypatch)
    packed_calls = []
    real = kernels._packed_segments

    def spy(*args: Any) -> Any:
        spans = real(*args)
        packed_calls.append(spans is not None)
        return spans

    monkeypatch.setattr(kernels, "_packed_segments", spy)
    shapes_used: list[tuple[int, ...]] = []
    real_matmul = kernels._onednn_matmul

    def spy_matmul(x: Any, weight: Any, bias: Any) -> Any:
        shapes_used.append(tuple(weight.shape))
        return real_matmul(x, weight, bias)

    monkeypatch.setattr(kernels, "_onednn_matmul", spy_matmul)
    cfg = TrainConfig(method=method, max_steps=3, per_device_batch_size=4, learning_rate=1e-2, save_steps=0)
    hooks = [FrozenNoise()] if perturb else []
    fast = train(make_loaded(), memorise_set(8), cfg, out_dir=tmp_path / "fast", hooks=hooks, progress=False)
    assert any(packed_calls), "transformers' packed mask never reached the packed path"
    assert all(packed_calls)
    vocab, hidden = fast.model.get_output_embeddings().weight.shape
    if method == "lora":  # the frozen LM head: forward and input gradient on oneDNN
        assert (hidden, vocab) in shapes_used, "the LM head's input gradient did not run on oneDNN"
    else:  # trained layers: weights converted at each call
        assert len(shapes_used) > 0
    monkeypatch.setattr(engine, "cpu_training", lambda model, **kwargs: contextlib.nullcontext())
    hooks = [FrozenNoise()] if perturb else []
    plain = train(make_loaded(), memorise_set(8), cfg, out_dir=tmp_path / "plain", hooks=hooks, progress=False)
    assert fast.metrics.losses == pytest.approx(plain.metrics.losses, rel=1e-4)
    want = dict(plain.model.named_parameters())
    for name, p in fast.model.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-4, rtol=1e-3, msg=name)
    head = fast.model.get_output_embeddings()
    assert not [m for m in fast.model.modules() if "forward" in vars(m)]  # restored after training
    if method == "lora":
        assert kernels._ONEDNN_WEIGHTS[head].transposed is None  # the gradients' copies are freed
