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
def test_decode_attention_matches_sdpa(heads: int, kv_heads: int, mask_kind: str) -> None:
    batch, kv_len = 4, 11
    q, k, v = _qkv(batch, heads, kv_heads, 1, kv_len)
    mask: Any = None
    if mask_kind != "none":
        mask = _padding_mask(batch, 1, kv_len + 2)  # masks may be wider than the cache; only kv_len columns count
        if mask_kind == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _Attn(heads // kv_heads)
    for scaling in (None, 0.3):
        got, _ = kernels.decode_attention(module, q, k, v, mask, scaling=scaling)
        ref_mask = mask[..., :kv_len] if mask is not None else None
        want, _ = sdpa_attention_forward(module, q, k, v, ref_mask, scaling=scaling)
        assert got.shape == want.shape == (batch, 1, heads, 16)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_decode_attention_hands_other_cases_to_sdpa() -> None:
    module = _Attn(2)
    q, k, v = _qkv(3, 4, 2, 5, 5)  # a prefill: five query tokens
    got, _ = kernels.decode_attention(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(got, want)
    q1, k1, v1 = _qkv(3, 4, 2, 1, 5)
    with pytest.raises(ValueError, match="softcap"):  # SDPA's own refusal, not a silently wrong result
        kernels.decode_attention(module, q1, k1, v1, None, softcap=30.0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 9, 64])
def test_split_head_is_bit_identical(bias: bool, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "HEAD_BLOCK", 100)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1037, bias=bias)  # 1037 = ten blocks of 100 and one of 37
    x = torch.randn(rows, 1, 32)
    assert torch.equal(kernels.split_head_forward(head)(x), F.linear(x, head.weight, head.bias))


def _loaded() -> LoadedModel:
    tok = make_tokenizer()
    tok.padding_side = "left"
    return LoadedModel(ref=ModelRef(base="tiny-llama"), model=make_model(tok, arch="llama"), tokenizer=tok)


def test_cpu_decoding_switches_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "HEAD_MIN_VOCAB", 16)
    model = _loaded().model
    head = model.get_output_embeddings()
    assert model.config._attn_implementation == "sdpa"
    with kernels.cpu_decoding(model):
        assert model.config._attn_implementation == kernels.BACKEND
        assert "forward" in vars(head)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(head)
    with pytest.raises(RuntimeError, match="boom"), kernels.cpu_decoding(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(head)
    model.config._attn_implementation = "eager"  # a user's choice of kernel is left alone
    with kernels.cpu_decoding(model):
        assert model.config._attn_implementation == "eager"


def test_engine_output_unchanged_by_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.models.generation as generation

    monkeypatch.setattr(kernels, "HEAD_MIN_VOCAB", 16)  # the tiny vocabulary (~400) is split too
    monkeypatch.setattr(kernels, "HEAD_BLOCK", 64)
    monkeypatch.setattr(kernels, "HEAD_MIN_ROWS", 1)
    calls = {"decode": 0}
    real = kernels.decode_attention

    def spy(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        calls["decode"] += query.shape[2] == 1
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(kernels, "decode_attention", spy)
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
    monkeypatch.setattr(generation, "cpu_decoding", lambda model: contextlib.nullcontext())
    plain = [g.text for g in engine.generate(prompts, cfg, progress=False)]
    assert fast == plain


def test_nested_blocks_leave_the_model_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "HEAD_MIN_VOCAB", 16)
    model = _loaded().model
    head = model.get_output_embeddings()
    outer = kernels.cpu_decoding(model)
    outer.__enter__()
    with kernels.cpu_decoding(model):  # finds the model switched: changes nothing
        assert model.config._attn_implementation == kernels.BACKEND
    assert model.config._attn_implementation == kernels.BACKEND and "forward" in vars(head)
    outer.__exit__(None, None, None)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(head)
