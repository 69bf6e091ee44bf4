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
