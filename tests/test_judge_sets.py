"""Loaders of the five labelled judge sources: one schema, deduplication, merged labels, errors that name the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesec.data.judge_sets import SOURCES, LabelledPair, LoadReport, dedupe, load_source, prompt_bucket
from tunesec.data.named import load_dataset_by_name
from tunesec.errors import UsageError


def test_every_source_loads_into_one_schema(shared_data: Path) -> None:
    sizes = {}
    for s in SOURCES:
        pairs, report = load_source(s, shared_data)
        sizes[s] = len(pairs)
        assert report.kept == len(pairs) and report.read >= len(pairs)
        assert all(p.source == s and p.prompt.strip() and isinstance(p.response, str) for p in pairs)
        assert all(p.harmful is not None or p.refused is not None for p in pairs)
        assert len({p.key for p in pairs}) == len(pairs)  # deduplicated
    # Counts of the files in ../shared/data/judge/README.md, less duplicates.
    assert sizes["harmbench"] == 602
    assert 2600 <= sizes["xstest"] <= 2700 and 6000 <= sizes["gptfuzz"] <= 7700 and 900 <= sizes["jailjudge"] <= 1000
    assert 7500 <= sizes["pku"] <= 9021


def test_xstest_labels(shared_data: Path) -> None:
    pairs, _ = load_source("xstest", shared_data)
    # Refusal labels from XSTest's annotators; a safe prompt's answer or a full refusal is never harmful.
    assert sum(p.refused is True for p in pairs) > 1000 and sum(p.refused is False for p in pairs) > 1000
    assert all(p.harmful is False for p in pairs if p.refused is True and p.origin.endswith("gpt4.csv:1"))
    # XSTest-Resp (WildGuard) contributes the harmful labels of unsafe-prompt compliances.
    assert 50 <= sum(p.harmful is True for p in pairs) <= 100
    models = {p.model for p in pairs}
    assert {"gpt-4", "llama-2-70b-chat", "mistral-7b-instruct"} <= models


def test_harmbench_majority_of_three(shared_data: Path) -> None:
    pairs, _ = load_source("harmbench", shared_data)
    assert sum(p.harmful for p in pairs if p.harmful is not None) == 273  # README: 273 positive
    assert sum(p.model is not None for p in pairs) >= 600 and len({p.model for p in pairs}) >= 20


def test_dedupe_merges_labels_and_drops_conflicts() -> None:
    a = LabelledPair("Q?", "Answer.", True, None, "x", "f:1")
    b = LabelledPair("  q? ", "answer.", None, False, "x", "f:2", model="m")
    c = LabelledPair("Other", "Reply", False, None, "x", "f:3")
    d = LabelledPair("other", "reply", True, True, "x", "f:4")
    report = LoadReport("x")
    out = dedupe([a, b, c, d], report)
    merged = {p.origin: p for p in out}
    assert merged["f:1"].harmful is True and merged["f:1"].refused is False and merged["f:1"].model == "m"
    # c and d disagree on harmful: unknown; d's refused label is kept.
    assert merged["f:3"].harmful is None and merged["f:3"].refused is True
    assert report.read == 4 and report.kept == 2 and report.conflicts == 1


def test_prompt_bucket_is_stable_and_normalised() -> None:
    assert prompt_bucket("How do I bake bread?") == prompt_bucket("  how do I   bake BREAD? ")
    assert 0 <= prompt_bucket("x") < 100


def test_registered_as_datasets(shared_data: Path) -> None:
    exs = load_dataset_by_name("judge-harmbench", data_dir=shared_data, limit=20, seed=0)
    assert len(exs) == 20
    ex = exs[0]
    assert [m.role for m in ex.messages] == ["user", "assistant"]
    assert ex.meta["harmful"] in (True, False) and ex.label in ("harmful", "safe")


def _judge_dir(tmp_path: Path) -> Path:
    d = tmp_path / "judge" / "jailbreakeval"
    d.mkdir(parents=True)
    return d


def test_bad_label_names_file_and_row(tmp_path: Path) -> None:
    d = _judge_dir(tmp_path)
    (d / "JAILJUDGEmini.csv").write_text("question,answer,label\nq1,a1,1\nq2,a2,maybe\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"JAILJUDGEmini.csv: row 2: field 'label' is 'maybe'; expected 0 or 1"):
        load_source("jailjudge", tmp_path)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="labelled judge data not found"):
        load_source("jailjudge", tmp_path)
    _judge_dir(tmp_path)
    with pytest.raises(UsageError, match=r"JAILJUDGEmini.csv: not found"):
        load_source("jailjudge", tmp_path)
    with pytest.raises(UsageError, match="unknown; expected one of"):
        load_source("nope", tmp_path)


def test_guardreasoner_input_must_parse(tmp_path: Path) -> None:
    d = tmp_path / "judge" / "guardreasoner"
    d.mkdir(parents=True)
    (d / "0_9_safe_rlhf.json").write_text(json.dumps([{"input": "no markers", "output": "harmful"}]))
    j = tmp_path / "judge" / "jailbreakeval"
    j.mkdir()
    (j / "Safe-RLHFmini.csv").write_text("question,answer,label\nq,a,0\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"0_9_safe_rlhf.json: item 0: field 'input'"):
        load_source("pku", tmp_path)
