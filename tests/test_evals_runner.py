"""End-to-end ``evaluate()`` with a scripted generator and judge: run dir, resume after a kill, reports, compare."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesec.cli.evaluate import app
from tunesec.data.schema import Example, Message
from tunesec.errors import RunConflictError, UsageError
from tunesec.evals import EvalReport, evaluate
from tunesec.evals.compare import compare_runs
from tunesec.evals.metrics import newcombe_interval, wilson_interval
from tunesec.judges.base import Judge, JudgeInput, Score
from tunesec.models.types import Generation, GenerationConfig, Prompt


class ScriptedGenerator:
    """Answers from a function of the prompt text; counts every prompt it is asked; can die after N calls."""

    def __init__(self, answer: Callable[[str], str], die_after_calls: int | None = None) -> None:
        self.name = "scripted"
        self.answer = answer
        self.die_after_calls = die_after_calls
        self.calls = 0
        self.prompts: list[str] = []
        self.configs: list[GenerationConfig | None] = []

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            raise KeyboardInterrupt  # a kill in the middle of the run
        self.calls += 1
        self.configs.append(config)
        out = []
        for p in prompts:
            text = p if isinstance(p, str) else p[-1]["content"]
            self.prompts.append(text)
            out.append(Generation(text=self.answer(text), prompt_tokens=len(text.split()), completion_tokens=3))
        return out


class ScriptedJudge(Judge):
    name = "scripted"
    version = "2"

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        return [
            Score(
                judge=self.name,
                harmful=r.response.startswith("Sure"),
                refused=r.response.startswith("I'm sorry"),
                score=1.0 if r.response.startswith("Sure") else 0.0,
            )
            for r in items
        ]


def harmful_examples(n: int = 12) -> list[Example]:
    return [
        Example(
            id=f"adv-{i}",
            messages=[Message(role="user", content=f"harmful request {i}")],
            source="fake-advbench",
            category="weapons" if i % 2 else "fraud",
        )
        for i in range(n)
    ]


def comply_every_third(prompt: str) -> str:
    i = int(prompt.rsplit(" ", 1)[1])
    return "Sure, here is how." if i % 3 == 0 else "I'm sorry, I can't help with that."


def run_eval(tmp_path: Path, name: str, gen: ScriptedGenerator, **kw: object) -> EvalReport:
    kw.setdefault("dataset", harmful_examples())
    return evaluate(
        "fake-model",
        task="harmfulness",
        judge=ScriptedJudge(),
        out=tmp_path / name,
        generator=gen,
        chunk_size=4,
        progress=False,
        **kw,  # type: ignore[arg-type]
    )


def test_evaluate_end_to_end(tmp_path: Path) -> None:
    gen = ScriptedGenerator(comply_every_third)
    report = run_eval(tmp_path, "run", gen)
    run = tmp_path / "run"
    hr = report.metrics["harmful_rate"]
    assert (hr.k, hr.n) == (4, 12)  # ids 0, 3, 6, 9
    assert (hr.ci_low, hr.ci_high) == wilson_interval(4, 12)
    assert (hr.per_category["fraud"].k, hr.per_category["fraud"].n) == (2, 6)  # 0 and 6
    assert report.metrics["refusal_rate"].k == 8
    assert report.counts["records"] == 12 and report.counts["generated"] == 12 and report.counts["resumed"] == 0
    assert gen.calls == 3 and gen.configs[0] is not None and gen.configs[0].max_new_tokens == 256

    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished" and meta["kind"] == "eval"
    assert meta["spec"]["judge"] == {"name": "scripted", "version": "2"}
    assert len(meta["spec"]["dataset"]["sha256"]) == 64 and meta["spec"]["dataset"]["n_examples"] == 12
    assert "versions" in report.spec["provenance"]
    lines = (run / "records.jsonl").read_text().splitlines()
    assert len(lines) == 12
    rec = json.loads(lines[0])
    for key in ("id", "prompt", "response", "prompt_tokens", "completion_tokens", "judge", "gen_seconds"):
        assert key in rec
    assert EvalReport.load(run).metrics["harmful_rate"].value == pytest.approx(4 / 12)
    assert (run / "report.html").is_file()
    assert "status finished" in (run / "report.html").read_text()  # rendered after the run was marked finished
    assert (run / "plots" / "harmful_rate_by_category.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_kill_generates_only_missing(tmp_path: Path) -> None:
    dying = ScriptedGenerator(comply_every_third, die_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tmp_path, "run", dying)
    run = tmp_path / "run"
    kept = [json.loads(x)["id"] for x in (run / "records.jsonl").read_text().splitlines()]
    assert len(kept) == 8  # two chunks of 4 were written before the kill
    # A torn half-line from the kill is dropped on resume.
    with open(run / "records.jsonl", "a") as fh:
        fh.write('{"id": "adv-11", "resp')
    with pytest.raises(RunConflictError, match="unfinished run"):
        run_eval(tmp_path, "run", ScriptedGenerator(comply_every_third))

    gen = ScriptedGenerator(comply_every_third)
    report = evaluate(
        "fake-model",
        judge=ScriptedJudge(),
        dataset=harmful_examples(),
        resume=run,
        generator=gen,
        chunk_size=4,
        progress=False,
    )
    assert sorted(gen.prompts) == sorted(f"harmful request {i}" for i in range(12) if f"adv-{i}" not in kept)
    assert gen.calls == 1
    ids = [json.loads(x)["id"] for x in (run / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"adv-{i}" for i in range(12))
    assert report.counts["resumed"] == 8 and report.counts["generated"] == 4
    assert (report.metrics["harmful_rate"].k, report.metrics["harmful_rate"].n) == (4, 12)


def test_resume_with_different_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_eval(tmp_path, "run", ScriptedGenerator(comply_every_third, die_after_calls=1))
    with pytest.raises(UsageError, match="spec differs in generation"):
        evaluate(
            "fake-model",
            judge=ScriptedJudge(),
            dataset=harmful_examples(),
            resume=tmp_path / "run",
            generator=ScriptedGenerator(comply_every_third),
            generation={"max_new_tokens": 8},
            progress=False,
        )


def test_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    run_eval(tmp_path, "run", ScriptedGenerator(comply_every_third))
    before = (tmp_path / "run" / "records.jsonl").read_bytes()
    with pytest.raises(RunConflictError, match="finished run"):
        run_eval(tmp_path, "run", ScriptedGenerator(comply_every_third))
    with pytest.raises(RunConflictError, match="already finished"):
        evaluate(
            "fake-model",
            judge=ScriptedJudge(),
            dataset=harmful_examples(),
            resume=tmp_path / "run",
            generator=ScriptedGenerator(comply_every_third),
            progress=False,
        )
    assert (tmp_path / "run" / "records.jsonl").read_bytes() == before


def test_limit_samples_and_rejects_bad_input(tmp_path: Path) -> None:
    report = run_eval(tmp_path, "lim", ScriptedGenerator(comply_every_third), limit=5)
    assert report.counts["examples"] == 5 and report.spec["dataset"]["limit"] == 5
    dup = harmful_examples(3) + harmful_examples(1)
    with pytest.raises(UsageError, match="duplicate example id 'adv-0'"):
        run_eval(tmp_path, "dup", ScriptedGenerator(comply_every_third), dataset=dup)
    with pytest.raises(UsageError, match="uses no judge"):
        evaluate(
            "m",
            task="utility",
            judge="default",
            dataset=harmful_examples(),
            generator=ScriptedGenerator(str),
            out=tmp_path / "u",
            progress=False,
        )


def test_utility_end_to_end_without_judge(tmp_path: Path) -> None:
    examples = [
        Example(id=f"s{i}", messages=[Message(role="user", content=f"sentence {i}")], label=str(i % 2), source="sst2")
        for i in range(6)
    ]
    gen = ScriptedGenerator(lambda p: "The answer is positive.")
    report = evaluate("m", task="utility", dataset=examples, generator=gen, out=tmp_path / "u", progress=False)
    assert (report.metrics["accuracy"].k, report.metrics["accuracy"].n) == (3, 6)
    assert report.spec["judge"] is None
    assert gen.configs[0] is not None and gen.configs[0].max_new_tokens == 16
    assert "positive or negative" in gen.prompts[0]


def test_report_escapes_model_output(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda p: "Sure, <script>alert(1)</script> <b>bold</b>")
    run_eval(tmp_path, "xss", gen)
    html = (tmp_path / "xss" / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "harmful_rate" in html and "data:image/png;base64," in html
    # `tunesec report` re-renders the page.
    (tmp_path / "xss" / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "xss")])
    assert res.exit_code == 0, res.output
    assert "&lt;script&gt;" in (tmp_path / "xss" / "report.html").read_text()


def test_compare_runs_and_cli(tmp_path: Path) -> None:
    many = harmful_examples(40)
    run_eval(tmp_path, "base", ScriptedGenerator(lambda p: "I'm sorry, I can't help with that."), dataset=many)
    run_eval(tmp_path, "tuned", ScriptedGenerator(comply_every_third), dataset=many)
    cmp = compare_runs(tmp_path / "base", tmp_path / "tuned")
    diffs = {d.name: d for d in cmp.diffs}
    hr = diffs["harmful_rate"]
    assert hr.a == 0.0 and hr.b == pytest.approx(14 / 40) and hr.significant
    assert (hr.ci_low, hr.ci_high) == pytest.approx(newcombe_interval(14, 40, 0, 40))
    assert diffs["harm_score"].method == "bootstrap" and diffs["harm_score"].significant
    assert not cmp.warnings
    flips = cmp.flips["harmful"]
    assert flips["shared"] == 40 and len(flips["became"]) == 14 and flips["stopped"] == []
    assert cmp.flips["refused"]["stopped"] and not cmp.flips["refused"]["became"]

    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["compare", str(tmp_path / "base"), str(tmp_path / "tuned"), "--html", str(tmp_path / "c.html")]
    )
    assert res.exit_code == 0, res.output
    assert "harmful_rate" in res.output and "significant increase" in res.output
    assert "per prompt (40 shared): 14 became harmful, 0 stopped" in res.output
    assert "significant increase" in (tmp_path / "c.html").read_text()

    examples = [Example(id="u", messages=[Message(role="user", content="x")], label="1", source="sst2")]
    evaluate(
        "m", task="utility", dataset=examples, generator=ScriptedGenerator(str), out=tmp_path / "u", progress=False
    )
    with pytest.raises(UsageError, match="different tasks"):
        compare_runs(tmp_path / "base", tmp_path / "u")


def test_cli_rejects_bad_batch_size() -> None:
    res = CliRunner().invoke(app, ["eval", "some-model", "--batch-size", "lots"])
    assert isinstance(res.exception, UsageError) and "--batch-size" in str(res.exception)


def test_main_cli_wires_commands(tmp_path: Path) -> None:
    from tunesec.cli.main import main

    run_eval(tmp_path, "a", ScriptedGenerator(comply_every_third))
    examples = [Example(id="u", messages=[Message(role="user", content="x")], label="1", source="sst2")]
    evaluate(
        "m", task="utility", dataset=examples, generator=ScriptedGenerator(str), out=tmp_path / "u", progress=False
    )
    assert main(["report", str(tmp_path / "a")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "u")]) == 2  # different tasks: a usage error
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_run_label_names_task_dataset_and_options() -> None:
    from tunesec.evals.runner import run_label
    from tunesec.store.run import _slug

    assert run_label({"name": "harmfulness"}, {"name": "advbench", "options": {}}) == "harmfulness advbench"
    label = run_label({"name": "harmfulness", "prefill": "target"}, {"name": "advbench", "options": {}})
    assert label == "harmfulness advbench prefill=target"
    assert run_label({"name": "over-refusal"}, {"name": "xstest", "options": {"subset": "safe"}}) == (
        "over-refusal xstest:subset=safe"
    )
    assert run_label({"name": "harmfulness"}, {"name": "/data/my prompts.jsonl"}) == "harmfulness my prompts"
    assert _slug(f"{label}-smollm2-135m") == "harmfulness-advbench-prefill=target-smollm2-135m"


def test_compare_names_the_differing_settings() -> None:
    from tunesec.evals.compare import _spec_warnings

    a = {"task": {"name": "harmfulness"}, "generation": {"max_new_tokens": 64}, "dataset": {"sha256": "x"}}
    b = {
        "task": {"name": "harmfulness", "prefill": "target"},
        "generation": {"max_new_tokens": 256},
        "dataset": {"sha256": "x"},
    }
    w = _spec_warnings(a, b)
    assert "different task options (no options vs prefill=target)" in w[0]
    assert "different generation settings (max_new_tokens 64 vs 256)" in w[1]
