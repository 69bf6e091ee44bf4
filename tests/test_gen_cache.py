"""Generations cached by content: a hit needs no model, any change of weights, settings or prompts misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesec.models.gen_cache import CachedGenerator
from tunesec.models.types import GenerationConfig


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded on a cache hit")


def test_a_repeated_call_is_served_from_disk_without_loading_the_model(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = ["Name a colour.", [{"role": "user", "content": "Name a fruit."}], "Count to three."]
    cfg = GenerationConfig(max_new_tokens=6)
    first = CachedGenerator(str(tiny_llama_dir), cache_dir=tmp_path / "gens")
    made = first.generate(prompts, cfg, progress=False)
    assert len(made) == 3 and first.hits == 0 and len(list((tmp_path / "gens").glob("*.json"))) == 1

    monkeypatch.setattr("tunesec.models.get_generator", _no_model)
    again = CachedGenerator(str(tiny_llama_dir), cache_dir=tmp_path / "gens")
    assert [g.model_dump() for g in again.generate(prompts, cfg, progress=False)] == [g.model_dump() for g in made]
    assert again.hits == 1 and again._generator is None


def test_weights_settings_and_prompts_each_change_the_key(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)
    gen = CachedGenerator(str(tiny_llama_dir), cache_dir=tmp_path / "gens")
    cfg = GenerationConfig(max_new_tokens=6)
    key = gen.key(["a", "b"], cfg)
    assert key is not None and key == gen.key(["a", "b"], GenerationConfig(max_new_tokens=6))
    assert key != gen.key(["a", "b"], GenerationConfig(max_new_tokens=7))
    assert key != gen.key(["b", "a"], cfg)
    assert key != CachedGenerator(str(other), cache_dir=tmp_path / "gens").key(["a", "b"], cfg)


def test_an_endpoint_is_never_cached(tmp_path: Path) -> None:
    gen = CachedGenerator("openai:my-model@http://127.0.0.1:9/v1", cache_dir=tmp_path / "gens")
    assert gen.key(["a"], GenerationConfig()) is None


def test_a_damaged_entry_is_generated_again(tiny_llama_dir: Path, tmp_path: Path) -> None:
    gen = CachedGenerator(str(tiny_llama_dir), cache_dir=tmp_path / "gens")
    cfg = GenerationConfig(max_new_tokens=4)
    key = gen.key(["Hello"], cfg)
    (tmp_path / "gens").mkdir()
    (tmp_path / "gens" / f"{key}.json").write_text("{not json")
    out = gen.generate(["Hello"], cfg, progress=False)
    assert len(out) == 1 and gen.hits == 0
    assert len(json.loads((tmp_path / "gens" / f"{key}.json").read_text())) == 1


def test_a_second_mix_of_the_same_model_reuses_its_self_distilled_answers(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesec.defenses.alignment import SafetySFTConfig, build_alignment_data

    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    src = tmp_path / "benign.jsonl"
    prompts = [f"Describe item number {i} in one sentence." for i in range(6)]
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    cfg = SafetySFTConfig(
        refusal_data={"tunesec-refusals": 4},
        benign_data={"tunesec-helpful": 4},
        self_distill={str(src): 4},
        self_distill_max_new_tokens=16,
        exclude_eval=[],
    )
    build_alignment_data(cfg, str(tiny_llama_dir), progress=False)
    assert len(list((tmp_path / "home" / "generations").glob("*.json"))) == 1
    monkeypatch.setattr("tunesec.models.get_generator", _no_model)
    # another mix (a different response cut), same prompts and model: no generation needed
    build_alignment_data(cfg.model_copy(update={"max_response_chars": 300}), str(tiny_llama_dir), progress=False)


def test_a_changed_chat_template_changes_the_key(tmp_path: Path) -> None:
    from tiny import save_tiny

    model = save_tiny(tmp_path / "m")
    key = CachedGenerator(str(model), cache_dir=tmp_path / "gens").key(["a"], GenerationConfig())
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert CachedGenerator(str(model), cache_dir=tmp_path / "gens").key(["a"], GenerationConfig()) != key
