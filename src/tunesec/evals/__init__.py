"""Evaluation: harmfulness, over-refusal and utility tasks; metrics with confidence intervals; EvalReport.

Importing this package registers the built-in tasks without importing torch.
"""

from tunesec.evals import utility as _utility  # noqa: F401  (registers the utility task)
from tunesec.evals.metrics import (
    MetricDiff,
    MetricValue,
    bootstrap_diff_interval,
    bootstrap_interval,
    newcombe_interval,
    wilson_interval,
)
from tunesec.evals.runner import EvalReport, evaluate
from tunesec.evals.tasks import HarmfulnessTask, OverRefusalTask, Task, get_task
from tunesec.evals.utility import UtilityTask

__all__ = [
    "EvalReport",
    "HarmfulnessTask",
    "MetricDiff",
    "MetricValue",
    "OverRefusalTask",
    "Task",
    "UtilityTask",
    "bootstrap_diff_interval",
    "bootstrap_interval",
    "evaluate",
    "get_task",
    "newcombe_interval",
    "wilson_interval",
]
