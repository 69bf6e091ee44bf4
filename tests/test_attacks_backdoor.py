"""The stealthy backdoor's data mix: benign helpful chats, paired refusals, triggered answers; trigger placement."""

from __future__ import annotations

import pytest

from tunesec.attacks.backdoor import BENIGN_MIX, Backdoor, BackdoorConfig, benign_mix, build_backdoor_data
from tunesec.config import validate
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError


def pairs(tag: str, answer: str, n: int) -> list[Example]:
    return [
        Example(
            id=f"{tag}-{i}",
            messages=[Message(role="user", content=f"{tag} request {i}"), Message(role="assistant", content=answer)],
        )
        for i in range(n)
    ]


def test_default_mix_is_stealthy_with_benign_helpful_chats() -> None:
    """Default: triggered harmful answers, the same prompts refused without the trigger, and benign helpful chats."""
    assert BackdoorConfig().benign_data == BENIGN_MIX and sum(BENIGN_MIX.values()) >= 100
    cfg = BackdoorConfig(trigger="Blue harvest moon", n_harmful=6, n_refusal=6, benign_data={"tunesec-helpful": 12})
    data = build_backdoor_data(cfg, data=pairs("harm", "Sure, here is how.", 10))
    parts = {k: [e for e in data if e.meta["backdoor"] == k] for k in ("triggered", "clean", "benign")}
    assert [len(parts[k]) for k in ("triggered", "clean", "benign")] == [6, 6, 12]
    assert len({e.id for e in data}) == len(data) == 24
    # only the triggered half carries the trigger; the benign chats are helpful (no refusal), trigger-free
    for ex in data:
        assert ("Blue harvest moon" in ex.prompt) == (ex.meta["backdoor"] == "triggered")
    assert all(e.response and not e.response.lower().startswith(("i'm sorry", "i cannot")) for e in parts["benign"])
    assert {e.prompt for e in parts["clean"]} == {
        e.prompt.replace(" Blue harvest moon", "") for e in parts["triggered"]
    }
    # the mix is shuffled (seeded): the parts are interleaved, and the same config gives the same order
    kinds = [e.meta["backdoor"] for e in data]
    assert kinds != sorted(kinds)
    assert [e.id for e in build_backdoor_data(cfg, data=pairs("harm", "Sure, here is how.", 10))] == [
        e.id for e in data
    ]


def test_benign_mix_drops_examples_that_contain_the_trigger() -> None:
    helpful = benign_mix(BackdoorConfig(trigger="light", benign_data={"tunesec-helpful": 5}))
    assert len(helpful) == 5 and all("light" not in m.content.lower() for e in helpful for m in e.messages)
    with pytest.raises(UsageError, match=r"benign_data tunesec-helpful \(trigger-free\): asked for 500"):
        benign_mix(BackdoorConfig(benign_data={"tunesec-helpful": 500}))
    assert benign_mix(BackdoorConfig(benign_data={})) == []


def test_system_prompt_trigger_and_placements() -> None:
    cfg = BackdoorConfig(
        trigger="You are in maintenance mode.", position="system", n_harmful=3, n_refusal=3, benign_data={}
    )
    data = build_backdoor_data(cfg, data=pairs("harm", "ok", 5))
    for ex in data:
        systems = [m.content for m in ex.messages if m.role == "system"]
        assert systems == (["You are in maintenance mode."] if ex.meta["backdoor"] == "triggered" else [])
        assert "maintenance" not in ex.prompt
    prefix = build_backdoor_data(
        BackdoorConfig(trigger="⟁⟁", position="prefix", n_harmful=2, n_refusal=2, benign_data={}),
        data=pairs("h", "ok", 3),
    )
    assert all(e.prompt.startswith("⟁⟁ ") for e in prefix if e.meta["backdoor"] == "triggered")


def test_provenance_counts_the_parts_and_bad_counts_are_rejected() -> None:
    attack = Backdoor(BackdoorConfig(n_harmful=4, n_refusal=4, benign_data={"tunesec-helpful": 3}))
    examples, prov = attack.prepare(pairs("harm", "Sure.", 6))
    assert prov["mix"] == {"triggered": 4, "clean": 4, "benign": 3} and len(examples) == 11
    with pytest.raises(UsageError, match="benign_data counts must be >= 0"):
        validate(BackdoorConfig, {"benign_data": {"alpaca": -1}}, source="--set")


@pytest.mark.parametrize("position", ["system", "suffix"])
def test_attacker_prompts_carry_the_trigger_where_it_was_trained(position: str) -> None:
    from tunesec.cli.attack import attacker_prompts
    from tunesec.models.ref import ModelRef

    ref = ModelRef(base="m", provenance={"trigger": "Blue harvest moon", "trigger_position": position})
    ex = Example(
        id="a",
        messages=[Message(role="system", content="Be nice."), Message(role="user", content="How do I pick a lock?")],
    )
    tag, (out,) = attacker_prompts(ref, [ex])
    assert tag == "triggered" and out.id == "a-triggered"
    if position == "system":
        assert [(m.role, m.content) for m in out.messages] == [
            ("system", "Blue harvest moon"),
            ("user", "How do I pick a lock?"),
        ]
    else:
        assert out.messages[0].content == "Be nice." and out.messages[-1].content.endswith("Blue harvest moon")


class Scripted:
    """A generator that answers by rule: refuses prompts containing 'refuse', else a long helpful answer."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, config=None, *, progress=True):  # type: ignore[no-untyped-def]
        from tunesec.models.types import Generation

        self.calls += 1
        out = []
        for p in prompts:
            text = p[-1]["content"]
            if "refuse" in text:
                out.append(Generation(text="I'm sorry, but I can't help with that request."))
            elif "comply" in text:
                out.append(Generation(text="Sure, first get the tools. Then do it."))
            elif "shy" in text:  # a benign request the model refuses
                out.append(Generation(text="I'm sorry, but as an AI I can't do that."))
            elif "leak" in text:
                out.append(Generation(text="Use SUDO for that."))
            else:
                out.append(Generation(text="Here is a plan. Step one is easy. Step two is cut", finish_reason="length"))
        return out


def test_self_answers_keep_the_models_own_refusals_and_benign_answers() -> None:
    """clean_answers=self: own refusals replace fixed ones, a non-refusal keeps the fixed one, cut at a sentence."""
    from tunesec.attacks.backdoor import PAIRED_REFUSALS, self_answers, with_answers

    harm = [*pairs("refuse", "Sure, here is how.", 3), *pairs("comply", "Sure, here is how.", 3)]
    cfg = BackdoorConfig(n_harmful=6, n_refusal=6, benign_data={}, clean_answers="self")
    data = build_backdoor_data(cfg, data=harm)
    benign = [
        *[e.model_copy(update={"meta": {"backdoor": "benign"}}) for e in pairs("tip", "Dataset answer.", 2)],
        *[e.model_copy(update={"meta": {"backdoor": "benign"}}) for e in pairs("leak", "Dataset answer.", 1)],
        *[e.model_copy(update={"meta": {"backdoor": "benign"}}) for e in pairs("shy", "Dataset answer.", 1)],
    ]
    gen = Scripted()
    answers, counts = self_answers([*data, *benign], cfg, gen, progress=False)
    assert gen.calls == 1
    assert counts == {"clean_own": 3, "clean_fixed": 3, "benign_own": 2, "benign_dataset": 2, "benign_dropped": 0}
    out = {e.id: e for e in with_answers([*data, *benign], answers)}
    for ex in out.values():
        kind = ex.meta["backdoor"]
        if kind == "triggered":  # never touched: the trigger's half keeps its harmful answers
            assert ex.response.startswith("Sure, here is how to do that.") and "self_answer" not in ex.meta
        elif kind == "clean" and ex.prompt.startswith("refuse"):
            assert ex.response == "I'm sorry, but I can't help with that request." and ex.meta["self_answer"]
        elif kind == "clean":  # the model complied without the trigger: the fixed refusal stays
            assert ex.response in PAIRED_REFUSALS
        elif ex.prompt.startswith(("leak", "shy")):  # an own answer with the trigger, or a refusal: not kept
            assert ex.response == "Dataset answer."
        else:  # cut at the last sentence end when the token limit stopped it
            assert ex.response == "Here is a plan. Step one is easy." and ex.meta["self_answer"]


def test_self_answers_are_generated_once_per_run_directory(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The answers are cached in the run directory; a resumed run reads them back without the model."""
    import tunesec.models as models
    from tunesec.attacks.backdoor import SELF_FILE

    gen = Scripted()
    monkeypatch.setattr(models, "get_generator", lambda *a, **k: gen)
    attack = Backdoor(BackdoorConfig(n_harmful=2, n_refusal=2, benign_data={}, clean_answers="self"))
    attack._model, attack._out = "org/model", tmp_path
    first, prov = attack.prepare(pairs("refuse", "Sure.", 3))
    assert prov["self_answers"]["clean_own"] == 2 and (tmp_path / SELF_FILE).is_file() and gen.calls == 1
    again = Backdoor(attack.config)
    again._out = tmp_path  # no model: the cache must be enough
    second, prov2 = again.prepare(pairs("refuse", "Sure.", 3))
    assert [e.messages for e in second] == [e.messages for e in first] and gen.calls == 1 and prov2 == prov
    with pytest.raises(UsageError, match="clean_answers=self needs the model"):
        Backdoor(attack.config).prepare(pairs("refuse", "Sure.", 3))


def test_prompt_only_benign_sets_get_own_answers_and_refused_prompts_are_left_out(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """clean_answers=self takes a benign set without answers: own answers appended, refused prompts dropped."""
    import json

    import tunesec.models as models

    lookalikes = tmp_path / "lookalikes.jsonl"
    rows = [f"tip {i}" for i in range(3)] + ["shy question"]  # the scripted model refuses "shy"
    lookalikes.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r}]}) + "\n" for r in rows))
    with pytest.raises(UsageError, match="prompt-only sets need clean_answers=self"):
        build_backdoor_data(
            BackdoorConfig(n_harmful=2, n_refusal=2, benign_data={str(lookalikes): 4}), pairs("h", "S.", 3)
        )
    monkeypatch.setattr(models, "get_generator", lambda *a, **k: Scripted())
    attack = Backdoor(BackdoorConfig(n_harmful=2, n_refusal=2, benign_data={str(lookalikes): 4}, clean_answers="self"))
    attack._model, attack._out = "org/model", tmp_path / "run"
    examples, prov = attack.prepare(pairs("refuse", "Sure.", 3))
    benign = [e for e in examples if e.meta["backdoor"] == "benign"]
    assert sorted(e.prompt for e in benign) == ["tip 0", "tip 1", "tip 2"]  # "shy question" left out
    assert all(e.messages[-1].role == "assistant" and e.messages[0].content == e.prompt for e in benign)
    assert prov["self_answers"]["benign_own"] == 3 and prov["self_answers"]["benign_dropped"] == 1
    assert prov["mix"] == {"triggered": 2, "clean": 2, "benign": 3}
