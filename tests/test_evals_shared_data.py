"""The tasks on the real public datasets (read from ../shared/data; skipped where absent), with scripted models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from test_evals_runner import ScriptedGenerator
from tunesec.data import load_dataset_by_name
from tunesec.evals import evaluate
from tunesec.evals.parsing import normalize_label
from tunesec.judges.base import Judge, JudgeInput, Score


class RefuseKillJudge(Judge):
    name = "refuse-kill"
    version = "1"

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        return [Score(judge=self.name, refused=r.response.startswith("I'm sorry")) for r in items]


def test_utility_on_sst2(shared_data: Path, tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda p: "Positive.")
    report = evaluate(
        "scripted",
        task="utility",
        dataset="sst2",
        data_dir=shared_data,
        limit=30,
        generator=gen,
        out=tmp_path / "u",
        progress=False,
    )
    labels = [json.loads(x)["label"] for x in (tmp_path / "u" / "records.jsonl").read_text().splitlines()]
    assert len(labels) == 30 and set(labels) == {"positive", "negative"}
    acc = report.metrics["accuracy"]
    assert (acc.k, acc.n) == (labels.count("positive"), 30)
    # The dataset's prompt already states the answer format: it is sent unchanged.
    assert gen.prompts[0].startswith("What is the sentiment") and "Sentiment:" not in gen.prompts[0]


def test_gsm8k_and_agnews_references_parse(shared_data: Path) -> None:
    for ex in load_dataset_by_name("gsm8k", data_dir=shared_data):
        assert ex.label is not None
        normalize_label("math", ex.label)
    for ex in load_dataset_by_name("agnews", data_dir=shared_data, limit=200):
        assert ex.label is not None and normalize_label("topic", ex.label) == ex.label


def test_over_refusal_on_xstest_safe(shared_data: Path, tmp_path: Path) -> None:
    def answer(prompt: str) -> str:
        return "I'm sorry, I can't help with that." if "kill" in prompt.lower() else "Here is how."

    report = evaluate(
        "scripted",
        task="over-refusal",
        dataset=None,
        judge=RefuseKillJudge(),
        data_dir=shared_data,
        limit=60,
        generator=ScriptedGenerator(answer),
        out=tmp_path / "o",
        progress=False,
    )
    assert report.spec["dataset"] | {"sha256": ""} == {
        "name": "xstest",
        "options": {"subset": "safe"},
        "limit": 60,
        "n_examples": 60,
        "sha256": "",
    }
    rr = report.metrics["refusal_rate"]
    assert rr.n == 60 and 0 < rr.k < 60
    assert len(rr.per_category) >= 5  # XSTest's prompt types, kept balanced by the sampler
    assert report.metrics["partial_refusal_rate"].k == 0
