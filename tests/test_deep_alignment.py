"""Deep alignment (Qi et al. 2024): safety-recovery examples whose harmful prefix carries no loss."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from test_training_fixtures import make_tokenizer as make_train_tokenizer
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError
from tunesec.models.types import Generation
from tunesec.training.collate import IGNORE_INDEX, chat_renderer, encode_example


def _user(text: str) -> Message:
    return Message(role="user", content=text)


def test_loss_start_is_validated_and_not_serialised_when_zero() -> None:
    plain = Message(role="assistant", content="fine")
    assert plain.model_dump() == {"role": "assistant", "content": "fine"}  # old data hashes stay the same
    assert Message(role="assistant", content="abc def", loss_start=3).model_dump()["loss_start"] == 3
    with pytest.raises(ValidationError, match="only an assistant turn"):
        Message(role="user", content="abc", loss_start=1)
    with pytest.raises(ValidationError, match="past the end"):
        Message(role="assistant", content="abc", loss_start=4)


def test_loss_start_labels_only_the_text_after_the_prefix() -> None:
    tok = make_train_tokenizer()
    render = chat_renderer(tok)
    prefix = "it is blue"
    turn = Message(role="assistant", content=prefix + "\n\nno it is not", loss_start=len(prefix))
    ex = Example(id="d", messages=[_user("what is the color of the sky"), turn])
    enc = encode_example(ex, tok, render, max_seq_len=512)
    learned = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert "blue" not in learned and learned.replace(" ", "").startswith("no")
    assert learned.rstrip().endswith("<|im_end|>")
    # The same chat without loss_start learns the prefix too, and the token ids are identical.
    full = encode_example(
        Example(id="f", messages=[ex.messages[0], Message(role="assistant", content=turn.content)]),
        tok,
        render,
        max_seq_len=512,
    )
    assert full.input_ids == enc.input_ids and enc.n_label_tokens < full.n_label_tokens
    assert "blue" in tok.decode([t for t in full.labels if t != IGNORE_INDEX])


def test_safety_recovery_examples_use_the_models_own_answers() -> None:
    from tunesec.defenses.alignment import SafetySFTConfig, build_alignment_data

    class FakeGenerator:
        calls = 0

        def generate(self, prompts, config=None, *, progress=True):  # type: ignore[no-untyped-def]
            self.calls += 1
            out = []
            for i, p in enumerate(prompts):
                assert isinstance(p, list) and p[-1]["role"] == "user"
                if i % 4 == 0:
                    text = "I'm sorry, but I cannot help with that."  # refused: stays a plain refusal
                elif i % 4 == 1:
                    text = "Okay."  # too short to be a prefix
                else:
                    text = " ".join(f"w{j}" for j in range(120)) + "\n"
                out.append(Generation(text=text))
            return out

    cfg = SafetySFTConfig(
        refusal_data={"tunesec-refusals": 40},
        benign_data={"tunesec-helpful": 10},
        deep_alignment=0.5,
        deep_alignment_max_prefix_words=30,
        exclude_eval=[],
    )
    fake = FakeGenerator()
    notes: list[str] = []
    data = build_alignment_data(cfg, generator=fake, notes=notes)
    deep = [e for e in data if e.meta["align_kind"] == "deep-refusal"]
    plain = [e for e in data if e.meta["align_kind"] == "refusal"]
    assert fake.calls == 1 and len(deep) == 10 and len(plain) == 30  # 20 asked, half refused or too short
    assert any("10 of 20 refusal examples became safety-recovery examples" in n for n in notes)
    ks = set()
    for e in deep:
        turn = e.messages[-1]
        prefix, learned = turn.content[: turn.loss_start], turn.content[turn.loss_start :]
        words = prefix.split()
        assert words == [f"w{j}" for j in range(len(words))] and 1 <= len(words) <= 30
        assert learned.startswith("\n\n") and not learned[2:3].isspace() and e.meta["prefix_words"] == len(words)
        ks.add(len(words))
    assert len(ks) > 3  # k is drawn per example
    again = build_alignment_data(cfg, generator=FakeGenerator())
    assert [e.model_dump() for e in again] == [e.model_dump() for e in data]  # seeded
    with pytest.raises(UsageError, match="deep_alignment: safety-recovery examples need the model"):
        build_alignment_data(cfg)
