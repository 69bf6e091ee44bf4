"""The refusal direction separates two prompt groups that a model represents differently."""

from __future__ import annotations

import torch

from tiny import make_model, make_tokenizer
from tunesec.models.directions import last_token_activations, refusal_directions
from tunesec.models.loading import LoadedModel
from tunesec.models.ref import ModelRef

HARMFUL = ["I'm sorry, but I cannot help", "I cannot help with that request", "sorry I cannot"]
HARMLESS = ["Write a poem about the sea", "What is the capital of France?", "bake bread with flour"]


def _tiny(**model_kwargs: int) -> LoadedModel:
    tok = make_tokenizer()
    return LoadedModel(ref=ModelRef(base="tiny"), model=make_model(tok, **model_kwargs), tokenizer=tok)


def test_direction_is_mean_difference_and_separates_groups() -> None:
    lm = _tiny(layers=3)
    harmful, harmless = HARMFUL, HARMLESS
    rd = refusal_directions(lm, harmful, harmless, batch_size=2)
    assert rd.directions.shape == (4, 64)
    acts_h = last_token_activations(lm, harmful)
    acts_s = last_token_activations(lm, harmless)
    torch.testing.assert_close(rd.directions, acts_h.mean(0) - acts_s.mean(0))
    u = rd.unit()
    assert abs(float(u.norm()) - 1.0) < 1e-5
    assert float((acts_h[:, rd.layer] @ u).mean()) > float((acts_s[:, rd.layer] @ u).mean())
    assert 1 <= rd.layer <= 3


def test_batched_activations_match_single_prompts() -> None:
    lm = _tiny()
    prompts = ["hello", "Write a poem about the sea and the sky, please"]
    batched = last_token_activations(lm, prompts, batch_size=2)
    single = torch.cat([last_token_activations(lm, [p]) for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_ablation_hooks_equal_weight_orthogonalization_and_choice_is_lowest_refusal_score() -> None:
    import copy

    from tunesec.attacks.refusal_ablation import WRITER_SUFFIXES, orthogonalize_
    from tunesec.models.chat import ChatFormatter
    from tunesec.models.directions import _ablation_hooks, _next_token_logprobs, select_by_ablation

    lm = _tiny(layers=4)
    tok = lm.tokenizer
    harmful, harmless = HARMFUL, HARMLESS
    rd = refusal_directions(lm, harmful, harmless, batch_size=2)
    encoded = [ChatFormatter(tok).encode([{"role": "user", "content": p}]) for p in harmless]
    before = _next_token_logprobs(lm, encoded, 2)
    u = rd.unit(2)
    handles = _ablation_hooks(lm.model, u, WRITER_SUFFIXES)
    hooked = _next_token_logprobs(lm, encoded, 2)
    for h in handles:
        h.remove()
    edited = LoadedModel(ref=lm.ref, model=copy.deepcopy(lm.model), tokenizer=tok)
    orthogonalize_(edited.model, u)
    torch.testing.assert_close(hooked, _next_token_logprobs(edited, encoded, 2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_next_token_logprobs(lm, encoded, 2), before)  # hooks removed
    assert not torch.allclose(hooked, before)

    layer, scores = select_by_ablation(lm, rd, harmful, harmless, candidates=[1, 2, 3], max_kl=1e9, batch_size=2)
    assert [s.layer for s in scores] == [1, 2, 3] and all(s.kl >= 0 for s in scores)
    assert layer == min(scores, key=lambda s: s.refusal_score).layer
    strict, _ = select_by_ablation(lm, rd, harmful, harmless, candidates=[1, 2, 3], max_kl=0.0, batch_size=2)
    assert strict == layer  # nothing admissible: the lowest score over all candidates


def test_generation_ranking_measures_refusal_under_ablation() -> None:
    from tunesec.models.directions import select_by_ablation

    lm = _tiny(layers=4)
    harmful, harmless = HARMFUL, HARMLESS
    rd = refusal_directions(lm, harmful, harmless, batch_size=2)
    layer, scores = select_by_ablation(
        lm, rd, harmful, harmless, candidates=[1, 2, 3], max_kl=1e9, batch_size=2, generate_tokens=4
    )
    assert all(s.refusal_rate is not None and 0.0 <= s.refusal_rate <= 1.0 for s in scores)
    assert layer == min(scores, key=lambda s: (s.refusal_rate, s.refusal_score)).layer
