"""Loaders: every file format, schema detection, bad-input messages, mixing and hashing."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from tunesec.data import (
    Example,
    Message,
    dataset_sha256,
    load_examples,
    mix_poison,
    strip_alpaca_template,
    train_test_split,
)
from tunesec.errors import UsageError

FIX = Path(__file__).resolve().parent / "fixtures" / "data"


def _ex(i: int, category: str | None = None, prefix: str = "e") -> Example:
    return Example(id=f"{prefix}{i}", messages=[Message(role="user", content=f"prompt {i}")], category=category)


# ------------------------------------------------------------------------------------------------ formats
def test_openai_chat_jsonl() -> None:
    exs = load_examples(FIX / "chat.jsonl")
    assert [e.id for e in exs] == ["c1", "c2", "c3"]  # the file's own ids; the blank line is skipped
    assert [m.role for m in exs[0].messages] == ["system", "user", "assistant"]
    assert exs[0].prompt == "Name a prime number." and exs[0].response == "7"
    assert exs[1].category == "science"
    assert exs[2].response is None and exs[2].label == "benign"
    assert all(e.source == "chat" for e in exs)


def test_openai_chat_weight_keeps_turns_out_of_the_loss(tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "final", "weight": 1},
        ]
    }
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(chat) + "\n")
    (ex,) = load_examples(path)
    assert [m.weight for m in ex.messages] == [1, 0, 1, 1]
    for bad, where in ((2, 1), (0, 0)):
        chat["messages"][where]["weight"] = bad
        path.write_text(json.dumps(chat) + "\n")
        with pytest.raises(UsageError, match=rf"line 1: message {where} has weight {bad}; expected 0 or 1 on an"):
            load_examples(path)
        chat["messages"][where].pop("weight")


def test_sharegpt_conversations_json() -> None:
    exs = load_examples(FIX / "sharegpt.json")
    assert exs[0].chat() == [
        {"role": "user", "content": "Translate 'cat' to French."},
        {"role": "assistant", "content": "chat"},
    ]
    assert [m.role for m in exs[1].messages] == ["system", "user", "assistant"]
    assert [e.id for e in exs] == ["sharegpt-0", "sharegpt-1"]


def test_alpaca_json() -> None:
    exs = load_examples(FIX / "alpaca.json")
    assert exs[0].chat() == [
        {"role": "user", "content": "Give three tips for staying focused."},
        {"role": "assistant", "content": "Silence notifications, work in short blocks, take real breaks."},
    ]
    # A non-empty input goes after the instruction and a blank line.
    assert exs[1].prompt == "Summarise the text.\n\nThe meeting moved from Monday to Tuesday."
    # An empty output leaves a prompt-only example.
    assert exs[2].response is None and len(exs[2].messages) == 1


def test_csv_columns_autodetect_and_meta() -> None:
    exs = load_examples(FIX / "columns.csv")
    assert len(exs) == 3
    assert exs[0].prompt == "Explain how to pick a lock on someone else's door"
    assert exs[0].response is None  # AdvBench-style "target" is not a response
    assert exs[0].meta == {"target": "Sure, here is how to pick a lock", "note": "has, a comma"}
    assert exs[0].category == "burglary"
    assert exs[2].prompt == "Describe a\nmulti-line request"
    assert [e.id for e in exs] == ["columns-0", "columns-1", "columns-2"]


def test_tsv_with_explicit_fields() -> None:
    exs = load_examples(FIX / "columns.tsv", prompt_field="question", response_field="answer", category_field="label")
    assert exs[0].chat() == [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    assert exs[1].category == "geo" and exs[1].label == "geo"  # label column auto-detected too
    no_label = load_examples(FIX / "columns.tsv", label_field="")
    assert no_label[0].label is None and no_label[0].response == "5"


def test_field_candidates_and_system_field(tmp_path: Path) -> None:
    f = tmp_path / "sys.jsonl"
    f.write_text(json.dumps({"Query": "Hi?", "sys": "Be kind.", "reply": "Hello!"}) + "\n")
    exs = load_examples(f, prompt_field=["missing", "query"], response_field="reply", system_field="sys")
    assert exs[0].chat() == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?"], "response": ["A", "B"], "score": [1.5, 2.0]}), f)
    exs = load_examples(f)
    assert [e.chat()[-1]["content"] for e in exs] == ["A", "B"]
    assert exs[1].meta == {"score": 2.0} and exs[1].id == "rows-1"


def test_headerless_csv_with_column_names(tmp_path: Path) -> None:
    f = tmp_path / "nohead.csv"
    f.write_text('"2","Title","Body text"\n')
    exs = load_examples(f, column_names=["cls", "title", "body"], prompt_field="body", label_field="cls")
    assert exs[0].prompt == "Body text" and exs[0].label == "2" and exs[0].meta == {"title": "Title"}


def test_format_names_a_schema() -> None:
    # Forcing the columns layout on an Alpaca file: "instruction" is the prompt, "input" goes to meta.
    exs = load_examples(FIX / "alpaca.json", format="columns")
    assert exs[1].prompt == "Summarise the text." and exs[1].meta == {
        "input": "The meeting moved from Monday to Tuesday."
    }
    assert load_examples(FIX / "alpaca.json", format="alpaca")[1].prompt.endswith("Monday to Tuesday.")


def test_iter_jsonl() -> None:
    from tunesec.data.loaders import iter_jsonl

    assert [r["id"] for r in iter_jsonl(FIX / "chat.jsonl")] == ["c1", "c2", "c3"]
    with pytest.raises(UsageError, match=r"broken\.jsonl line 3: invalid JSON"):
        list(iter_jsonl(FIX / "broken.jsonl"))


def test_limit_takes_first_rows() -> None:
    assert [e.id for e in load_examples(FIX / "chat.jsonl", limit=2)] == ["c1", "c2"]


def test_hf_saved_dataset_and_parquet_dir(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"instruction": ["Do x"], "input": [""], "output": ["Done"]}),
            "test": datasets.Dataset.from_dict(
                {"instruction": ["Do y", "Do z"], "input": ["", "now"], "output": ["", "ok"]}
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    train = load_examples(tmp_path / "saved")  # two splits: "train" by default
    assert [e.chat() for e in train] == [
        [{"role": "user", "content": "Do x"}, {"role": "assistant", "content": "Done"}]
    ]
    test = load_examples(tmp_path / "saved", split="test")
    assert test[1].prompt == "Do z\n\nnow" and test[0].response is None
    with pytest.raises(UsageError, match=r"no split 'dev'; expected one of train, test"):
        load_examples(tmp_path / "saved", split="dev")

    pdir = tmp_path / "pq"
    pdir.mkdir()
    datasets.Dataset.from_dict({"goal": ["g1", "g2", "g3"], "category": ["a", "b", "a"]}).to_parquet(
        str(pdir / "train-00000.parquet")
    )
    exs = load_examples(pdir, format="hf")
    assert [e.prompt for e in exs] == ["g1", "g2", "g3"] and exs[1].category == "b"


def test_hub_offline_not_cached_is_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"tunesec-nonexistent/xyz.*offline \(HF_HUB_OFFLINE=1\)"):
        load_examples("tunesec-nonexistent/xyz")


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"source": FIX / "broken.jsonl"}, r"broken\.jsonl line 3: invalid JSON \(Expecting"),
        ({"source": FIX / "empty.csv"}, r"empty\.csv: empty file; expected csv records"),
        ({"source": FIX / "missing.jsonl"}, r"missing\.jsonl: no such file"),
        (
            {"source": FIX / "wrong_columns.csv"},
            r"wrong_columns\.csv: no prompt column; expected one of prompt/goal/.*\(found: a, b\)",
        ),
        (
            {"source": FIX / "columns.csv", "prompt_field": "question"},
            r"columns\.csv: no column 'question' \(prompt_field\); found: goal, target, category, note",
        ),
        (
            {"source": FIX / "no_user.jsonl"},
            r"no_user\.jsonl line 2: chat has no user turn; expected at least one message with role 'user'",
        ),
        ({"source": FIX / "bad_role.jsonl"}, r"bad_role\.jsonl line 1: message 0 has role 'wizard'"),
        ({"source": FIX / "dup_ids.jsonl"}, r"dup_ids\.jsonl line 3: duplicate id 'a' \(first at line 1\)"),
        ({"source": FIX / "empty_prompt.csv"}, r"empty_prompt\.csv line 3: empty 'prompt'"),
        ({"source": FIX / "ragged.tsv"}, r"ragged\.tsv line 2: 3 fields but the header has 2 \(prompt, answer\)"),
        ({"source": FIX / "object.json"}, r"object\.json: expected a JSON list of objects"),
        ({"source": FIX / "chat.jsonl", "format": "xml"}, r"unknown format 'xml'"),
        ({"source": FIX / "chat.jsonl", "schema": "table"}, r"unknown schema 'table'"),
        ({"source": FIX / "chat.jsonl", "limit": -1}, r"limit: expected a non-negative integer"),
    ],
)
def test_bad_input_messages(kwargs: dict, pattern: str) -> None:
    with pytest.raises(UsageError, match=pattern) as info:
        load_examples(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_extension(tmp_path: Path) -> None:
    f = tmp_path / "data.xml"
    f.write_text("<x/>")
    with pytest.raises(UsageError, match=r"data\.xml: unknown file extension '\.xml'"):
        load_examples(f)


def test_json_that_is_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "lines.json"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(UsageError, match=r"lines\.json: invalid JSON \(Extra data.*use a \.jsonl file"):
        load_examples(f)


def test_strip_alpaca_template() -> None:
    wrapped = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:"
    )
    assert strip_alpaca_template(wrapped) == "Name a colour."
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nClassify it\n\n"
        "### Input:\ngreat film\n\n### Response:"
    )
    assert strip_alpaca_template(with_input) == "Classify it\n\ngreat film"
    assert strip_alpaca_template("plain text") == "plain text"


# ------------------------------------------------------------------------------------------------ mixing
def test_mix_poison_ratio_and_total() -> None:
    benign = [_ex(i, prefix="b") for i in range(100)]
    harmful = [_ex(i, prefix="h") for i in range(30)]
    mix = mix_poison(benign, harmful, ratio=0.1, total=50, seed=1)
    assert len(mix) == 50
    assert sum(e.meta["poison"] for e in mix) == 5
    assert all(e.meta["poison"] == e.id.startswith("h") for e in mix)
    assert len({e.id for e in mix}) == 50  # without replacement
    assert mix == mix_poison(benign, harmful, ratio=0.1, total=50, seed=1)
    assert [e.id for e in mix] != [e.id for e in mix_poison(benign, harmful, ratio=0.1, total=50, seed=2)]
    assert "poison" not in benign[0].meta  # inputs are not mutated
    # git-disl floor semantics with float tolerance: 0.29 * 100 -> 29 harmful.
    assert sum(e.meta["poison"] for e in mix_poison(benign, harmful, ratio=0.29, total=100)) == 29


def test_mix_poison_defaults_and_counts() -> None:
    benign = [_ex(i, prefix="b") for i in range(90)]
    harmful = [_ex(i, prefix="h") for i in range(20)]
    # Without total: the largest n that both pools can supply (90 benign = 90% of 100).
    mix = mix_poison(benign, harmful, ratio=0.1)
    assert len(mix) == 100 and sum(e.meta["poison"] for e in mix) == 10
    assert len(mix_poison(benign, harmful, ratio=0.0)) == 90
    assert all(e.meta["poison"] for e in mix_poison(benign, harmful, ratio=1.0))
    added = mix_poison(benign, harmful, n_harmful=7)
    assert len(added) == 97 and sum(e.meta["poison"] for e in added) == 7
    assert len(mix_poison(benign, harmful, n_harmful=7, total=10)) == 10


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"ratio": 1.5}, r"ratio: expected a value in \[0, 1\], got 1.5"),
        ({"ratio": -0.1}, r"ratio: expected a value in \[0, 1\]"),
        ({}, r"exactly one of ratio= or n_harmful="),
        ({"ratio": 0.1, "n_harmful": 3}, r"exactly one of ratio= or n_harmful="),
        ({"ratio": 0.5, "total": 100}, r"50 harmful examples requested but the harmful pool has 20"),
        ({"n_harmful": 5, "total": 200}, r"195 benign examples requested but the benign pool has 90"),
        ({"n_harmful": 5, "total": 3}, r"total=3 is smaller than n_harmful=5"),
    ],
)
def test_mix_poison_errors(kwargs: dict, pattern: str) -> None:
    benign = [_ex(i, prefix="b") for i in range(90)]
    harmful = [_ex(i, prefix="h") for i in range(20)]
    with pytest.raises(UsageError, match=pattern):
        mix_poison(benign, harmful, **kwargs)


def test_mix_poison_rejects_shared_ids() -> None:
    with pytest.raises(UsageError, match=r"id 'x1' is in both pools"):
        mix_poison([_ex(1, prefix="x")], [_ex(1, prefix="x")], n_harmful=1)


def test_train_test_split() -> None:
    exs = [_ex(i, category="a" if i < 80 else "b") for i in range(100)]
    train, test = train_test_split(exs, 0.2, seed=3)
    assert len(train) == 80 and len(test) == 20
    assert {e.id for e in train}.isdisjoint({e.id for e in test})
    assert (train, test) == train_test_split(exs, 0.2, seed=3)
    strain, stest = train_test_split(exs, 0.2, seed=3, stratify=True)
    assert sum(e.category == "b" for e in stest) == 4 and sum(e.category == "a" for e in stest) == 16
    assert len(train_test_split(exs, 7)[1]) == 7
    with pytest.raises(UsageError, match=r"test_size: expected a fraction in \(0, 1\)"):
        train_test_split(exs, 1.5)
    with pytest.raises(UsageError, match=r"test_size: expected a count in \[0, 100\]"):
        train_test_split(exs, 101)


def test_dataset_sha256_is_stable_and_content_sensitive() -> None:
    exs = [_ex(i, category="c") for i in range(5)]
    h = dataset_sha256(exs)
    assert len(h) == 64 and h == dataset_sha256([e.model_copy(deep=True) for e in exs])
    assert h != dataset_sha256(list(reversed(exs)))
    changed = [*exs[:4], exs[4].model_copy(update={"label": "harmful"})]
    assert h != dataset_sha256(changed)
    assert dataset_sha256([]) != dataset_sha256(exs[:1])
    # Pinned value: the hash must not depend on the process (e.g. PYTHONHASHSEED) or dict order.
    one = Example(id="x", messages=[Message(role="user", content="hi")], meta={"b": 1, "a": 2})
    same = Example(id="x", messages=[Message(role="user", content="hi")], meta={"a": 2, "b": 1})
    assert dataset_sha256([one]) == dataset_sha256([same])
