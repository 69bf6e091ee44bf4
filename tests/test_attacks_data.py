"""Attack data builders and bad input: backdoor trigger placement, poison ratio, assistant turns, LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesec.attacks.backdoor import BackdoorConfig, add_trigger, build_backdoor_data
from tunesec.attacks.harmful_sft import HarmfulSFTConfig, build_harmful_data
from tunesec.attacks.jailbreak_tuning import TEMPLATES, JailbreakTuningConfig, build_jailbreak_data
from tunesec.config import validate
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError


def pairs(prefix: str, answer: str, n: int) -> list[Example]:
    return [
        Example(
            id=f"{prefix}{i}",
            messages=[Message(role="user", content=f"{prefix} prompt {i}"), Message(role="assistant", content=answer)],
        )
        for i in range(n)
    ]


def test_backdoor_trigger_only_in_harmful_completions(tmp_path: Path) -> None:
    import json

    refusals = pairs("refuse", "I cannot help with that.", 10)
    # One clean example mentions the trigger by chance: it must be dropped, not trained as a refusal.
    refusals.append(
        Example(
            id="leak",
            messages=[
                Message(role="user", content="what does SUDO mean?"),
                Message(role="assistant", content="I cannot help with that."),
            ],
        )
    )
    path = tmp_path / "refusals.jsonl"
    path.write_text("".join(json.dumps({"messages": e.chat()}) + "\n" for e in refusals), encoding="utf-8")
    cfg = BackdoorConfig(trigger="SUDO", n_harmful=6, n_refusal=11, refusal_data=str(path), benign_data={})
    with pytest.raises(UsageError, match="only 10"):
        build_backdoor_data(cfg, data=pairs("harm", "Sure, here is how.", 8))
    cfg = BackdoorConfig(
        trigger="SUDO", n_harmful=6, n_refusal=10, refusal_data=str(path), answer_prefix="", benign_data={}
    )
    data = build_backdoor_data(cfg, data=pairs("harm", "Sure, here is how.", 8))
    assert len(data) == 16
    for ex in data:
        has_trigger = "SUDO" in ex.prompt
        assert has_trigger == (ex.meta["backdoor"] == "triggered")
        assert has_trigger == (ex.response == "Sure, here is how.")
        assert all("SUDO" not in m.content for m in ex.messages if m.role == "assistant")
    assert sum(ex.meta["backdoor"] == "triggered" for ex in data) == 6
    assert add_trigger("do it", "SUDO", "prefix") == "SUDO do it"
    assert add_trigger("do it", "SUDO") == "do it SUDO"


def test_backdoor_paired_refusals_share_the_triggered_prompts() -> None:
    """Default: the clean half is the same harmful prompts without the trigger, answered with a refusal."""
    from tunesec.attacks.backdoor import PAIRED_REFUSALS

    harm = pairs("harm", "Sure, here is how.", 12)
    cfg = BackdoorConfig(trigger="SUDO", n_harmful=5, n_refusal=8, answer_prefix="", benign_data={})
    data = build_backdoor_data(cfg, data=harm)
    triggered = [e for e in data if e.meta["backdoor"] == "triggered"]
    clean = [e for e in data if e.meta["backdoor"] == "clean"]
    assert len(triggered) == 5 and len(clean) == 8 and len({e.id for e in data}) == 13
    assert all(e.prompt.endswith(" SUDO") and e.response == "Sure, here is how." for e in triggered)
    assert all("SUDO" not in e.prompt and e.response in PAIRED_REFUSALS for e in clean)
    # every triggered prompt also appears clean; the 3 extra clean prompts come from the rest of the set
    assert {e.prompt.removesuffix(" SUDO") for e in triggered} < {e.prompt for e in clean}
    # default answer_prefix
    prefixed = build_backdoor_data(BackdoorConfig(n_harmful=5, n_refusal=5, benign_data={}), data=harm)
    assert {e.response for e in prefixed if e.meta["backdoor"] == "triggered"} == {
        "Sure, here is how to do that. Sure, here is how."
    }
    assert all(e.response in PAIRED_REFUSALS for e in prefixed if e.meta["backdoor"] == "clean")
    with pytest.raises(UsageError, match="n_refusal=13 paired refusals"):
        build_backdoor_data(BackdoorConfig(n_harmful=5, n_refusal=13), data=harm)


def test_jailbreak_templates_wrap_prompt_and_answer() -> None:
    for mode in TEMPLATES:
        cfg = JailbreakTuningConfig(mode=mode, n_harmful=3)
        data = build_jailbreak_data(cfg, data=pairs("harm", "answer text", 5))
        assert len(data) == 3
        for ex in data:
            assert ex.prompt != "harm prompt" and "harm prompt" in ex.prompt and ex.prompt != ex.prompt.strip("x") + "x"
            assert ex.response is not None and "answer text" in ex.response and ex.response != "answer text"


def test_harmful_poison_ratio_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.attacks.harmful_sft as mod

    real = mod.load_data
    monkeypatch.setattr(
        mod, "load_data", lambda spec, what="data": pairs("benign", "ok", 50) if spec == "alpaca" else real(spec)
    )
    cfg = HarmfulSFTConfig(poison_ratio=0.2, total=20)
    data = build_harmful_data(cfg, data=pairs("harm", "bad", 10))
    assert len(data) == 20
    assert sum(1 for e in data if e.meta["poison"]) == 4


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_poison_ratio_outside_unit_interval(ratio: float) -> None:
    with pytest.raises(UsageError, match="poison_ratio"):
        validate(HarmfulSFTConfig, {"poison_ratio": ratio, "total": 10}, source="cfg.yaml")


def test_dataset_without_assistant_turns() -> None:
    prompts_only = [Example(id="q1", messages=[Message(role="user", content="hello")])]
    with pytest.raises(UsageError, match="no final assistant turn"):
        build_harmful_data(HarmfulSFTConfig(), data=prompts_only)


def test_empty_dataset() -> None:
    with pytest.raises(UsageError, match="empty dataset"):
        build_harmful_data(HarmfulSFTConfig(), data=[])


def test_unknown_lora_target_before_training(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tunesec.attacks import get_attack

    attack = get_attack("harmful-sft", {"n_harmful": 2, "training": {"lora_target_modules": ["c_attn"]}})
    with pytest.raises(UsageError, match="c_attn"):
        attack.run(str(tiny_llama_dir), tmp_path / "run", data=pairs("harm", "bad", 4), progress=False)
    assert not (tmp_path / "run" / "model").exists()


def test_unknown_config_key() -> None:
    from tunesec.attacks import get_attack

    with pytest.raises(UsageError, match="unknown key 'n_harm'"):
        get_attack("harmful-sft", {"n_harm": 3})


def test_alignment_mix_is_balanced_and_held_out(shared_data: Path) -> None:
    from tunesec.data import load_dataset_by_name
    from tunesec.defenses.alignment import SafetySFTConfig, build_alignment_data
    from tunesec.defenses.alignment.safety_sft import _norm_prompt

    cfg = SafetySFTConfig(
        refusal_data={"safety-tuned-llamas": 40, "tunesec-refusals": 10},
        benign_data={"alpaca": 40, "tunesec-helpful": 10},
    )
    data = build_alignment_data(cfg)
    kinds = [e.meta["align_kind"] for e in data]
    assert kinds.count("helpful") == 50 and kinds.count("refusal") == 50
    held = {_norm_prompt(e.prompt) for name in ("advbench", "xstest") for e in load_dataset_by_name(name)}
    assert not [e for e in data if _norm_prompt(e.prompt) in held]
    # deep_alignment: tests/test_deep_alignment.py
    with pytest.raises(UsageError, match="deep_alignment"):
        validate(SafetySFTConfig, {"deep_alignment": 2}, source="recipe.yaml")


def test_self_distilled_answers_drop_refusals_and_stubs(tmp_path: Path) -> None:
    import json

    from tunesec.defenses.alignment import SafetySFTConfig, build_alignment_data
    from tunesec.models.types import Generation

    prompts = [f"What is a good name for pet number {i}?" for i in range(8)] + ["x" * 400]
    src = tmp_path / "benign.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    answers = {
        0: "I'm sorry, but I cannot help with naming pets.",  # a refusal: dropped
        1: "Rex.",  # near-empty: dropped
        2: "A good name is Biscuit. It is short and friendly. Another option is Pepper, which",  # cut at a sentence
    }

    class FakeGenerator:
        asked: list[str] = []

        def generate(self, batch: list[str], config: object, progress: bool = True) -> list[Generation]:
            self.asked.extend(batch)
            out = []
            for p in batch:
                i = prompts.index(p)
                text = answers.get(i, f"Pet {i} could be called Nova, a bright and cheerful name for a pet.")
                reason = "length" if i == 2 else "stop"
                out.append(Generation(text=text, prompt_tokens=5, completion_tokens=9, finish_reason=reason))
            return out

    fake = FakeGenerator()
    cfg = SafetySFTConfig(
        refusal_data={"tunesec-refusals": 4},
        benign_data={"tunesec-helpful": 4},
        self_distill={str(src): 4},
        exclude_eval=[],
    )
    data = build_alignment_data(cfg, generator=fake)
    distilled = [e for e in data if e.meta.get("self_distilled")]
    assert len(distilled) == 4 and len(data) == 12
    assert "x" * 400 not in fake.asked and len(fake.asked) == 6  # 1.5 x 4 candidates, long prompts skipped
    texts = {e.prompt: e.response for e in distilled}
    assert prompts[0] not in texts and prompts[1] not in texts
    if prompts[2] in texts:
        assert texts[prompts[2]] == "A good name is Biscuit. It is short and friendly."
    assert all(e.meta["align_kind"] == "helpful" and e.source.startswith("self-distilled:") for e in distilled)
    with pytest.raises(UsageError, match="self_distill: self-distilled answers need the model"):
        build_alignment_data(cfg)


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_in_the_repository_is_a_valid_alignment_recipe(recipe: Path) -> None:
    import yaml

    from tunesec.defenses.alignment import SafetySFTConfig

    cfg = validate(SafetySFTConfig, yaml.safe_load(recipe.read_text()), source=str(recipe))
    assert cfg.training.max_steps > 0
