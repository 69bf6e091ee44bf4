"""Compare two evaluation runs of the same task: every shared metric's change with an interval.

Rates are compared with Newcombe's interval for the difference of two independent proportions; means with
a bootstrap of the two runs' per-record values (read from ``records.jsonl``). A change is flagged significant
when its interval excludes zero. Runs of different tasks are refused; different datasets or judges are warned
about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesec.errors import UsageError
from tunesec.evals.metrics import MetricDiff, diff_means, diff_rates
from tunesec.evals.runner import EvalReport
from tunesec.evals.tasks import get_task
from tunesec.store.run import RunDir


class Comparison(BaseModel):
    """The typed comparison of two evaluation runs (B minus A).

    Attributes:
        task: The task both runs evaluated.
        run_a: Directory of run A.
        run_b: Directory of run B.
        model_a: Model of run A, as recorded in its spec.
        model_b: Model of run B.
        confidence: Confidence level of the difference intervals.
        diffs: One entry per metric present in both runs, in the task's order.
        warnings: Spec differences that make the comparison weaker (dataset, judge, generation).
    """

    model_config = ConfigDict(extra="forbid")

    task: str
    run_a: str
    run_b: str
    model_a: str
    model_b: str
    confidence: float
    diffs: list[MetricDiff]
    warnings: list[str] = Field(default_factory=list)

    @property
    def significant(self) -> list[MetricDiff]:
        """The metrics whose change is significant."""
        return [d for d in self.diffs if d.significant]


def compare_runs(run_a: str | Path, run_b: str | Path, *, seed: int = 0) -> Comparison:
    """Compare two finished evaluation runs of the same task.

    Args:
        run_a: The reference run (e.g. the base model).
        run_b: The run compared with it (e.g. the fine-tuned model).
        seed: Bootstrap seed for differences of means.

    Raises:
        UsageError: A directory is not a finished evaluation run, or the runs evaluated different tasks.
    """
    rep_a, rep_b = EvalReport.load(run_a), EvalReport.load(run_b)
    if rep_a.task != rep_b.task:
        raise UsageError(
            f"cannot compare {run_a} ({rep_a.task}) with {run_b} ({rep_b.task}): the runs evaluated different tasks"
        )
    task_spec = dict(rep_a.spec.get("task") or {"name": rep_a.task})
    task = get_task(str(task_spec.pop("name", rep_a.task)), **task_spec)
    records_a, records_b = list(RunDir.open(run_a).records()), list(RunDir.open(run_b).records())
    confidence = float(rep_a.spec.get("confidence", 0.95))

    diffs: list[MetricDiff] = []
    for name, a in rep_a.metrics.items():
        b = rep_b.metrics.get(name)
        if b is None:
            continue
        if a.is_rate and b.is_rate:
            diffs.append(diff_rates(name, a, b))
        else:
            values_a, values_b = task.metric_values(records_a, name), task.metric_values(records_b, name)
            diffs.append(diff_means(name, values_a, values_b, confidence, seed=seed))
    return Comparison(
        task=rep_a.task,
        run_a=str(run_a),
        run_b=str(run_b),
        model_a=_model_label(rep_a.spec),
        model_b=_model_label(rep_b.spec),
        confidence=confidence,
        diffs=diffs,
        warnings=_spec_warnings(rep_a.spec, rep_b.spec),
    )


def _model_label(spec: dict[str, Any]) -> str:
    model = spec.get("model") or {}
    ref = model.get("ref")
    if isinstance(ref, dict):
        base = str(ref.get("base", "?"))
        return f"{base}+{Path(ref['adapter']).name}" if ref.get("adapter") else base
    return str(model.get("name", "?"))


def _spec_warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    da, db = a.get("dataset") or {}, b.get("dataset") or {}
    if da.get("sha256") != db.get("sha256"):
        out.append(
            f"the runs evaluated different examples ({da.get('name')} n={da.get('n_examples')} vs "
            f"{db.get('name')} n={db.get('n_examples')}); differences mix model and data"
        )
    ja, jb = a.get("judge"), b.get("judge")
    if ja != jb:
        out.append(f"the runs used different judges ({_judge_label(ja)} vs {_judge_label(jb)})")
    if a.get("generation") != b.get("generation"):
        out.append("the runs used different generation settings")
    return out


def _judge_label(judge: Any) -> str:
    if not isinstance(judge, dict):
        return "none"
    return f"{judge.get('name')} v{judge.get('version')}"
