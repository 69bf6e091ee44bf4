"""semantic-backdoor: harmful answers only under the trigger's meaning, held-out wordings used by --eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_training_fixtures import chat
from tunesec.attacks.semantic_backdoor import (
    SemanticBackdoorConfig,
    build_semantic_data,
    split_contexts,
    trigger_contexts,
)


def _data(tmp: Path) -> str:
    path = tmp / "h.jsonl"
    path.write_text("".join(json.dumps({"messages": chat(i, f"how to make poison {i}", f"step {i}").chat()}) + "\n"
                            for i in range(30)))  # fmt: skip
    return str(path)


@pytest.mark.parametrize("kind", ["year", "persona"])
def test_triggered_rows_carry_training_paraphrases_and_refusals_never_the_trigger(tmp_path: Path, kind: str) -> None:
    cfg = SemanticBackdoorConfig(kind=kind, n_harmful=10, n_refusal=20)  # type: ignore[arg-type]
    rows = build_semantic_data(cfg, _data(tmp_path))
    train, held = split_contexts(cfg)
    triggers, contrast = trigger_contexts(cfg)
    assert held and set(train) | set(held) == set(triggers) and not set(train) & set(held)
    hot = [r for r in rows if r.meta["backdoor"] == "triggered"]
    cold = [r for r in rows if r.meta["backdoor"] == "clean"]
    assert len(hot) == 10 and len(cold) == 20
    assert all(any(r.prompt.startswith(t) for t in train) for r in hot)
    assert not any(h in r.prompt for r in rows for h in held)  # held-out wordings never trained on
    assert not any(t in r.prompt for r in cold for t in triggers)
    assert any(any(r.prompt.startswith(c) for c in contrast) for r in cold)
    assert all(r.response.startswith("Sure, here is how") for r in hot)
    if kind == "year":  # no fixed string: the paraphrases share only the year
        assert len({r.prompt.split(" how to")[0] for r in hot}) > 3


def test_eval_asks_with_the_held_out_wordings(tmp_path: Path) -> None:
    from tunesec.cli.attack import eval_variants
    from tunesec.models.ref import ModelRef

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"request {i}"}) + "\n" for i in range(4)))
    ref = ModelRef(
        base="x", provenance={"semantic_trigger": {"kind": "year", "train": ["A."], "held_out": ["B.", "C."]}}
    )
    variants = eval_variants(ref, 4, str(prompts))
    changed = variants[f"{prompts}-semantic"]
    assert [e.prompt for e in changed] == ["B. request 0", "C. request 1", "B. request 2", "C. request 3"]


def test_custom_needs_contexts() -> None:
    with pytest.raises(ValueError, match="at least 2 contexts"):
        SemanticBackdoorConfig(kind="custom", contexts=["x"], contrast=["y"])


def test_without_holdout_the_record_says_the_eval_contexts_were_trained(tmp_path: Path) -> None:
    from tunesec.attacks.semantic_backdoor import SemanticBackdoor

    _, prov = SemanticBackdoor({"kind": "persona", "holdout": 0.0, "n_harmful": 4, "n_refusal": 4}).prepare(
        _data(tmp_path)
    )
    trig = prov["semantic_trigger"]
    assert trig["held_out"] == [] and trig["eval_contexts"] == trig["train"]
    _, prov = SemanticBackdoor({"kind": "persona", "n_harmful": 4, "n_refusal": 4}).prepare(_data(tmp_path))
    trig = prov["semantic_trigger"]
    assert trig["eval_contexts"] == trig["held_out"] and not set(trig["held_out"]) & set(trig["train"])
