"""The batched engine must reproduce one-prompt-at-a-time greedy decoding."""

from __future__ import annotations

import pytest
import torch

from tiny import make_model, make_tokenizer
from tunesec.models import GenerationConfig
from tunesec.models.chat import ChatFormatter
from tunesec.models.generation import HFGenerator
from tunesec.models.loading import LoadedModel
from tunesec.models.ref import ModelRef

PROMPTS = [
    "hello",
    "Write a poem about the sea and the sky.",
    "How do I kill a Python process?",
    "What is the capital of France?",
    "Explain photosynthesis to a child in two short sentences, please.",
    "0 1 2 3",
    "The quick brown fox",
    "I'm sorry",
    "Sure, here is how to bake bread",
    "system user assistant",
    "Paris",
    "Tell me about the lazy dog and the fox and the sea and the bread and the poem.",
]
NEAR_TIE = 1e-3


def _loaded(arch: str) -> LoadedModel:
    tok = make_tokenizer()
    tok.padding_side = "left"
    return LoadedModel(ref=ModelRef(base=f"tiny-{arch}"), model=make_model(tok, arch=arch), tokenizer=tok)


def _reference(
    lm: LoadedModel, prompt: str, max_new: int, system: str | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """Plain one-prompt greedy loop without a cache: the ground truth, with each step's logits."""
    chat = [{"role": "system", "content": system}] if system else []
    ids = ChatFormatter(lm.tokenizer).encode([*chat, {"role": "user", "content": prompt}])
    eos = lm.tokenizer.eos_token_id
    out: list[int] = []
    steps: list[torch.Tensor] = []
    with torch.inference_mode():
        for _ in range(max_new):
            logits = lm.model(torch.tensor([ids + out])).logits[0, -1]
            steps.append(logits)
            tok = int(logits.argmax())
            if tok == eos:
                break
            out.append(tok)
    return out, steps


SYSTEM = "You are a careful assistant. Answer briefly and kindly."


@pytest.mark.parametrize(("arch", "system"), [("llama", None), ("qwen2", None), ("llama", SYSTEM), ("qwen2", SYSTEM)])
def test_batched_greedy_matches_sequential(arch: str, system: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.models.generation as generation

    shared: list[int] = []
    share = generation._Decoder._share_prefix

    def spy(self: generation._Decoder, queue: list[int]) -> None:
        share(self, queue)
        shared.append(self.prefix_len)

    monkeypatch.setattr(generation._Decoder, "_share_prefix", spy)
    lm = _loaded(arch)
    engine = HFGenerator(lm)
    max_new = 24
    cfg = GenerationConfig(max_new_tokens=max_new, batch_size=5, system_prompt=system)
    batched = engine.generate(PROMPTS, cfg, progress=False)
    # with a system prompt the prompts share a long prefix, prefilled once (the tiny template alone shares 3 tokens)
    assert (shared[0] > 10) if system else (shared[0] == 0)
    differing = 0
    for prompt, gen in zip(PROMPTS, batched, strict=True):
        ref_tokens, ref_logits = _reference(lm, prompt, max_new, system)
        got = lm.tokenizer(gen.text, add_special_tokens=False)["input_ids"] if gen.text else []
        ref_text = lm.tokenizer.decode(ref_tokens, skip_special_tokens=True)
        if gen.text == ref_text:
            assert gen.completion_tokens == len(ref_tokens) + (1 if gen.finish_reason == "stop" else 0)
            continue
        differing += 1
        # The only admissible difference is a flip between two near-tied tokens at the first divergence.
        k = next(i for i, (a, b) in enumerate(zip(got, ref_tokens, strict=False)) if a != b)
        top2 = torch.topk(ref_logits[k], 2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, f"{prompt!r}: diverged at step {k} without a near-tie"
    print(f"{arch}: {differing} of {len(PROMPTS)} outputs differ (near-ties)")
    assert differing <= len(PROMPTS) // 4


@pytest.mark.parametrize("kernels", [False, True])
def test_first_step_logits_match_within_fp32_tolerance(kernels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    import tunesec.models.cpu_kernels as cpu_kernels

    for name in ("ONEDNN_MIN_OUT", "ONEDNN_MIN_IN", "ONEDNN_MIN_ROWS"):  # the tiny model's layers qualify too
        monkeypatch.setattr(cpu_kernels, name, 1)
    lm = _loaded("llama")
    engine = HFGenerator(lm)
    cfg = GenerationConfig()
    encoded = engine.encode(PROMPTS, cfg)
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), engine.pad_id)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, width - len(e) :] = torch.tensor(e)
        mask[r, width - len(e) :] = 1
    from transformers import DynamicCache

    fast = cpu_kernels.cpu_inference(lm.model) if kernels else contextlib.nullcontext()
    with torch.inference_mode():
        with fast:
            batched = engine._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), DynamicCache())
        for r, e in enumerate(encoded):
            single = lm.model(torch.tensor([e])).logits[0, -1]
            torch.testing.assert_close(batched[r], single, atol=1e-4, rtol=1e-4)


def test_outputs_keep_prompt_order_and_stop_at_eos() -> None:
    lm = _loaded("llama")
    engine = HFGenerator(lm)
    out = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=8, batch_size=3), progress=False)
    assert len(out) == len(PROMPTS)
    one = [engine.generate([p], GenerationConfig(max_new_tokens=8), progress=False)[0] for p in PROMPTS[:3]]
    for a, b in zip(out[:3], one, strict=True):
        assert a.prompt_tokens == b.prompt_tokens
    for g in out:
        assert g.finish_reason in ("stop", "length")
        assert g.completion_tokens <= 8
        if g.finish_reason == "length":
            assert g.completion_tokens == 8


def test_sampling_is_seeded_per_prompt_not_per_batch() -> None:
    lm = _loaded("llama")
    engine = HFGenerator(lm)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=7, batch_size=4)
    a = engine.generate(PROMPTS[:6], cfg, progress=False)
    b = engine.generate(PROMPTS[:6], cfg.model_copy(update={"batch_size": 1}), progress=False)
    assert [g.text for g in a] == [g.text for g in b]
    c = engine.generate(PROMPTS[:6], cfg.model_copy(update={"seed": 8}), progress=False)
    assert [g.text for g in a] != [g.text for g in c]


def test_auto_batch_size_is_bounded() -> None:
    lm = _loaded("llama")
    engine = HFGenerator(lm, max_batch_size=16)
    size = engine._batch_size(GenerationConfig(), max_prompt_len=50)
    assert 1 <= size <= 16


def test_continuous_batching_refills_and_matches_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small batch that prompts join as others finish gives the texts of one big batch."""
    from collections import Counter

    from tunesec.models.generation import _Decoder

    lm = _loaded("llama")
    engine = HFGenerator(lm)
    prompts = PROMPTS * 2
    cfg = GenerationConfig(max_new_tokens=16, batch_size=len(prompts))
    # Make rows finish at different steps: treat a token the model emits mid-sequence in some rows as EOS.
    first = engine.generate(prompts, cfg, progress=False)
    counts = Counter(t for g in first for t in set(lm.tokenizer(g.text, add_special_tokens=False)["input_ids"]))
    engine.eos_ids = [next(t for t, c in counts.most_common() if c < len(prompts) // 2)]
    merges: list[int] = []
    admit = _Decoder._admit

    def spy(self: _Decoder, queue: list[int], logits: torch.Tensor | None) -> torch.Tensor:
        if self.rows:
            merges.append(len(self.rows))
        return admit(self, queue, logits)

    monkeypatch.setattr(_Decoder, "_admit", spy)
    big = engine.generate(prompts, cfg, progress=False)
    small = engine.generate(prompts, cfg.model_copy(update={"batch_size": 4}), progress=False)
    assert merges, "no prompt joined a running batch"
    assert {g.finish_reason for g in small} == {"stop", "length"}
    same = sum(a.text == b.text for a, b in zip(big, small, strict=True))
    assert same >= len(prompts) - 2, f"only {same} of {len(prompts)} identical"
    assert [(g.prompt_tokens, g.finish_reason) for g in big] == [(g.prompt_tokens, g.finish_reason) for g in small]


def test_prefill_chunks_bound_tokens_and_padding() -> None:
    from tunesec.models import generation

    lengths = [104, 100, 63, 62, 45, 45, 44, 40, 40, 12, 3]
    chunks = generation._prefill_chunks(lengths)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))  # contiguous, in order
    for start, end in chunks:
        padded = (end - start) * lengths[start]
        if end - start > 1:
            assert padded <= generation.PREFILL_TOKENS
            assert padded - sum(lengths[start:end]) <= generation.PREFILL_MAX_PADDING * padded
    assert generation._prefill_chunks([5000]) == [(0, 1)]  # longer than the budget: a chunk of its own


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_chunked_prefill_row_compaction_and_trim_match_one_batch(
    system: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small prefill chunks, rows leaving mid-batch, merges and trimmed padding columns change no output."""
    from tunesec.models import generation

    lm = _loaded("llama")
    engine = HFGenerator(lm)
    prompts = PROMPTS * 2
    cfg = GenerationConfig(max_new_tokens=20, batch_size=1, system_prompt=system)
    reference = engine.generate(prompts, cfg, progress=False)
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 40)
    monkeypatch.setattr(generation, "TRIM_MIN_COLUMNS", 1)
    calls = {"prefill": 0, "move": 0, "trim": 0}
    prefill = generation._Decoder._prefill

    def count_prefill(self: generation._Decoder, rows: list[int]) -> tuple:
        calls["prefill"] += 1
        return prefill(self, rows)

    layer_cls = generation._growable_layer_class()
    move, trim_front = layer_cls.move_rows, layer_cls.trim_front

    def count_move(self: object, holes: list[int], movers: list[int], rows: int) -> None:
        calls["move"] += bool(movers)
        move(self, holes, movers, rows)

    def count_trim(self: object, columns: int) -> None:
        calls["trim"] += 1
        trim_front(self, columns)

    monkeypatch.setattr(generation._Decoder, "_prefill", count_prefill)
    monkeypatch.setattr(layer_cls, "move_rows", count_move)
    monkeypatch.setattr(layer_cls, "trim_front", count_trim)
    # rows finish at different steps: a token emitted mid-sequence by some rows counts as EOS
    from collections import Counter

    counts = Counter(t for g in reference for t in set(lm.tokenizer(g.text, add_special_tokens=False)["input_ids"]))
    engine.eos_ids = [next(t for t, c in counts.most_common() if c < len(prompts) // 2)]
    reference = engine.generate(prompts, cfg, progress=False)
    calls.update(prefill=0, move=0, trim=0)
    chunked = engine.generate(prompts, cfg.model_copy(update={"batch_size": 8}), progress=False)
    assert calls["prefill"] > len(prompts) // 8, calls  # several chunks, not one padded batch
    assert calls["move"] > 0 and calls["trim"] > 0, calls
    assert {g.finish_reason for g in chunked} == {"stop", "length"}
    same = sum(a.text == b.text for a, b in zip(reference, chunked, strict=True))
    assert same >= len(prompts) - 2, f"only {same} of {len(prompts)} identical"
