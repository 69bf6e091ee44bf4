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
        warnings: Spec differences that make the comparison weaker (dataset, task options, judge, generation),
            each naming the differing settings.
        flips: Per-prompt changes of each yes/no record field (``harmful``, ``refused``, ``correct`` ...) over the
            examples both runs share: ``{field: {"became": [ids], "stopped": [ids], "shared": n}}``.
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
    flips: dict[str, dict[str, Any]] = Field(default_factory=dict)

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
        model_a=model_label(rep_a.spec),
        model_b=model_label(rep_b.spec),
        confidence=confidence,
        diffs=diffs,
        warnings=_spec_warnings(rep_a.spec, rep_b.spec),
        flips=_flips(records_a, records_b),
    )


FLIP_FIELDS = ("harmful", "refused", "correct")


def _flips(records_a: list[dict[str, Any]], records_b: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each yes/no field, the shared example ids where it turned on (``became``) or off (``stopped``) in B."""
    by_id = {r.get("id"): r for r in records_a}
    shared = [(by_id[r.get("id")], r) for r in records_b if r.get("id") in by_id]
    out: dict[str, dict[str, Any]] = {}
    for field in FLIP_FIELDS:
        pairs = [(a.get(field), b.get(field), b.get("id")) for a, b in shared]
        pairs = [(x, y, i) for x, y, i in pairs if isinstance(x, bool) and isinstance(y, bool)]
        if not pairs:
            continue
        out[field] = {
            "became": [i for x, y, i in pairs if y and not x],
            "stopped": [i for x, y, i in pairs if x and not y],
            "shared": len(pairs),
        }
    return out


def model_label(spec: dict[str, Any]) -> str:
    """A run's model in a few words: base+adapter folder from its ref, else its name (attack runs: the spec string)."""
    model = spec.get("model") or {}
    if not isinstance(model, dict):
        return str(model)
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
    ta, tb = a.get("task") or {}, b.get("task") or {}
    if ta != tb:
        out.append(f"the runs used different task options ({_options(ta)} vs {_options(tb)})")
    ja, jb = a.get("judge"), b.get("judge")
    if ja != jb:
        out.append(f"the runs used different judges ({_judge_label(ja)} vs {_judge_label(jb)})")
    ga, gb = a.get("generation") or {}, b.get("generation") or {}
    if ga != gb:
        keys = sorted(k for k in set(ga) | set(gb) if ga.get(k) != gb.get(k))
        what = ", ".join(f"{k} {ga.get(k)} vs {gb.get(k)}" for k in keys)
        out.append(f"the runs used different generation settings ({what})")
    return out


def _options(task: dict[str, Any]) -> str:
    opts = [f"{k}={v}" for k, v in sorted(task.items()) if k != "name"]
    return ", ".join(opts) if opts else "no options"


def _judge_label(judge: Any) -> str:
    if not isinstance(judge, dict):
        return "none"
    return f"{judge.get('name')} v{judge.get('version')}"
