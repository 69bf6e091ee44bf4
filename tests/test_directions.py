"""The refusal direction separates two prompt groups that a model represents differently."""

from __future__ import annotations

import torch

from tiny import make_model, make_tokenizer
from tunesec.models.directions import last_token_activations, refusal_directions
from tunesec.models.loading import LoadedModel
from tunesec.models.ref import ModelRef


def test_direction_is_mean_difference_and_separates_groups() -> None:
    tok = make_tokenizer()
    lm = LoadedModel(ref=ModelRef(base="tiny"), model=make_model(tok, layers=3), tokenizer=tok)
    harmful = ["I'm sorry, but I cannot help", "I cannot help with that request", "sorry I cannot"]
    harmless = ["Write a poem about the sea", "What is the capital of France?", "bake bread with flour"]
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
    tok = make_tokenizer()
    lm = LoadedModel(ref=ModelRef(base="tiny"), model=make_model(tok), tokenizer=tok)
    prompts = ["hello", "Write a poem about the sea and the sky, please"]
    batched = last_token_activations(lm, prompts, batch_size=2)
    single = torch.cat([last_token_activations(lm, [p]) for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
