"""Tokenisation with assistant-only labels, truncation, collators and the loss on packed rows."""

from __future__ import annotations

import pytest

from test_training_fixtures import chat, make_loaded, make_tokenizer, memorise_set
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError
from tunesec.training.collate import (
    IGNORE_INDEX,
    chat_renderer,
    collate_packed,
    encode_dataset,
    encode_example,
    features,
    make_padded_collator,
)


def _labelled_text(tok, enc) -> list[str]:
    return [tok.convert_ids_to_tokens(t) for t in enc.labels if t != IGNORE_INDEX]


def test_only_assistant_tokens_carry_labels_single_turn() -> None:
    tok = make_tokenizer()
    render = chat_renderer(tok)
    ex = chat(0, "what is the color of the sky", "it is blue", system="say yes")
    enc = encode_example(ex, tok, render, max_seq_len=512)
    # The labelled tokens are exactly the answer and its end-of-turn marker.
    assert _labelled_text(tok, enc) == ["it", "is", "blue", "<|im_end|>"]
    # Unlabelled tokens are the rest of the rendered text, in order.
    full = tok(render(ex.chat(), False), add_special_tokens=False)["input_ids"]
    assert enc.input_ids == full
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids, strict=True))
    first_label = next(i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(enc.input_ids[first_label - 2 : first_label]) == ["<|im_start|>", "assistant"]


def test_multi_turn_labels_every_assistant_turn_and_no_user_turn() -> None:
    tok = make_tokenizer()
    ex = Example(
        id="mt",
        messages=[
            Message(role="user", content="say hello"),
            Message(role="assistant", content="hello world"),
            Message(role="user", content="count to three"),
            Message(role="assistant", content="one two three"),
        ],
    )
    enc = encode_example(ex, tok, chat_renderer(tok), max_seq_len=512)
    assert _labelled_text(tok, enc) == ["hello", "world", "<|im_end|>", "one", "two", "three", "<|im_end|>"]
    # "hello" appears in the user turn too and must not be labelled there.
    hello = tok.convert_tokens_to_ids("hello")
    positions = [i for i, t in enumerate(enc.input_ids) if t == hello]
    assert len(positions) == 2
    assert enc.labels[positions[0]] == IGNORE_INDEX and enc.labels[positions[1]] == hello


def test_an_assistant_turn_of_weight_zero_is_not_learned() -> None:
    tok = make_tokenizer()
    ex = Example(
        id="w",
        messages=[
            Message(role="user", content="say hello"),
            Message(role="assistant", content="hello world", weight=0),
            Message(role="user", content="count to three"),
            Message(role="assistant", content="one two three"),
        ],
    )
    enc = encode_example(ex, tok, chat_renderer(tok), max_seq_len=512)
    assert _labelled_text(tok, enc) == ["one", "two", "three", "<|im_end|>"]
    assert ex.model_dump()["messages"][3] == {"role": "assistant", "content": "one two three"}  # default not dumped


def test_truncation_and_dropping_examples_without_labels() -> None:
    tok = make_tokenizer()
    render = chat_renderer(tok)
    long_ex = chat(0, "tell me about the cat " * 5, "the cat sat on the mat")
    enc = encode_example(long_ex, tok, render, max_seq_len=12)
    assert len(enc.input_ids) == 12 and enc.truncated and enc.n_label_tokens == 0
    kept = encode_dataset([long_ex, chat(1, "say hello", "hello world")], tok, render, max_seq_len=12)
    assert [e.example_id for e in kept] == ["ex1"]
    with pytest.raises(UsageError, match="max_seq_len=12"):
        encode_dataset([long_ex], tok, render, max_seq_len=12)


def test_bad_examples_are_usage_errors_naming_the_example() -> None:
    tok = make_tokenizer()
    render = chat_renderer(tok)
    no_assistant = Example(id="q7", messages=[Message(role="user", content="say hello")])
    with pytest.raises(UsageError, match="'q7'.*no assistant turn"):
        encode_dataset([no_assistant], tok, render, 64)
    ends_with_user = Example(
        id="q8",
        messages=[
            Message(role="user", content="hi"),
            Message(role="assistant", content="yes"),
            Message(role="user", content="no"),
        ],
    )
    with pytest.raises(UsageError, match="'q8'.*last message"):
        encode_dataset([ends_with_user], tok, render, 64)
    with pytest.raises(UsageError, match="empty"):
        encode_dataset([], tok, render, 64)
    with pytest.raises(UsageError, match="duplicate example id 'ex0'"):
        encode_dataset([chat(0, "a", "b"), chat(0, "c", "d")], tok, render, 64)


def test_tokenizer_without_chat_template_uses_the_fallback_template() -> None:
    tok = make_tokenizer()
    tok.chat_template = None
    enc = encode_example(chat(0, "say hello", "hello world"), tok, chat_renderer(tok), max_seq_len=512)
    assert _labelled_text(tok, enc)[:2] == ["hello", "world"]


def test_packed_collator_resets_positions_and_masks_boundaries() -> None:
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = collate_packed(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    padded = make_padded_collator(0)(rows)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["labels"].tolist() == [[5, 6, 7], [-100, 9, -100]]


def test_packed_loss_equals_padded_loss_and_hf_loss() -> None:
    import torch

    from tunesec.training.trainer import lm_loss_sum

    loaded = make_loaded()
    tok, model = loaded.tokenizer, loaded.model.eval()
    rows = features(encode_dataset(memorise_set(5), tok, chat_renderer(tok), 512))
    with torch.no_grad():
        packed_sum, n1, _ = lm_loss_sum(model, collate_packed(rows))
        padded_sum, n2, _ = lm_loss_sum(model, make_padded_collator(0)(rows))
        full_sum, n3, _ = lm_loss_sum(model, collate_packed(rows), logits_to_keep=False)
        hf = 0.0
        for r in rows:
            out = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]))
            n = sum(1 for t in r["labels"][1:] if t != -100)
            hf += float(out.loss) * n
    assert n1 == n2 == n3 == sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    assert float(packed_sum) == pytest.approx(float(padded_sum), rel=1e-5)
    assert float(packed_sum) == pytest.approx(float(full_sum), rel=1e-5)
    assert float(packed_sum) == pytest.approx(hf, rel=1e-5)
