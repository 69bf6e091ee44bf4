"""Verdicts: each check's observed value and interval against its bound, and the overall decision.

Decision rule for one check with interval ``[low, high]`` and bound ``b``:

- ``max`` bound: PASS when ``high <= b``, FAIL when ``low > b``, else INCONCLUSIVE;
- ``min`` bound: PASS when ``low >= b``, FAIL when ``high < b``, else INCONCLUSIVE.

The overall verdict is FAIL if any check fails, else INCONCLUSIVE if any is inconclusive, else PASS (skipped
checks do not count). Exit codes for CI pipelines: 0 PASS, 1 FAIL, 3 INCONCLUSIVE (2 is a usage error).

For an inconclusive check, :func:`samples_to_decide` gives the sample size per model at which the interval
would no longer straddle the bound if the observed rates stayed as they are: the smallest ``n`` for which the
same interval method (Wilson for a rate, Newcombe for a difference of rates) computed at the observed
proportions excludes the bound; for means, the bootstrap half-width scaled by ``1/sqrt(n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesec.evals.metrics import newcombe_interval, wilson_interval

Status = Literal["pass", "fail", "inconclusive", "skipped"]
Decision = Literal["PASS", "FAIL", "INCONCLUSIVE"]
EXIT_CODES: dict[str, int] = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
MAX_SAMPLES = 1_000_000


class CheckResult(BaseModel):
    """The outcome of one check, with every number that decided it.

    Attributes:
        name: Check name from the policy.
        kind: ``metric`` or ``trigger``.
        description: What the check guards against.
        status: pass, fail, inconclusive or skipped.
        reason: One sentence explaining the status.
        task: Evaluation task (metric checks).
        dataset: Dataset evaluated.
        metric: Metric name.
        on: ``tuned`` (the tuned value) or ``change`` (tuned minus base).
        op: ``<=`` or ``>=``.
        threshold: The bound.
        observed: The observed value (tuned value or change).
        ci_low: Lower end of its interval.
        ci_high: Upper end of its interval.
        method: Interval method (wilson, newcombe, bootstrap, mcnemar-exact).
        base_value: Base model's value (metric checks).
        tuned_value: Tuned model's value.
        n_base: Samples of the base evaluation.
        n_tuned: Samples of the tuned evaluation.
        samples_to_decide: For an inconclusive check: samples per model that would decide it at the observed
            rates (None when it cannot be decided, e.g. the observed value equals the bound).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["metric", "trigger"] = "metric"
    description: str = ""
    status: Status
    reason: str = ""
    task: str | None = None
    dataset: str | None = None
    metric: str | None = None
    on: Literal["tuned", "change"] | None = None
    op: Literal["<=", ">="] | None = None
    threshold: float | None = None
    observed: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    method: str | None = None
    base_value: float | None = None
    tuned_value: float | None = None
    n_base: int | None = None
    n_tuned: int | None = None
    samples_to_decide: int | None = None


class Verdict(BaseModel):
    """The overall decision and every check's result."""

    model_config = ConfigDict(extra="forbid")

    decision: Decision
    checks: list[CheckResult] = Field(default_factory=list)
    summary: str = ""

    @property
    def exit_code(self) -> int:
        """0 PASS, 1 FAIL, 3 INCONCLUSIVE."""
        return EXIT_CODES[self.decision]


def decide_interval(low: float, high: float, op: Literal["<=", ">="], bound: float) -> Status:
    """PASS / FAIL / INCONCLUSIVE for an interval against a bound (see the module docstring)."""
    if op == "<=":
        if high <= bound:
            return "pass"
        if low > bound:
            return "fail"
        return "inconclusive"
    if low >= bound:
        return "pass"
    if high < bound:
        return "fail"
    return "inconclusive"


def combine(checks: list[CheckResult]) -> Verdict:
    """The overall verdict from the checks' statuses, with a one-line summary."""
    failed = [c.name for c in checks if c.status == "fail"]
    open_ = [c.name for c in checks if c.status == "inconclusive"]
    counted = [c for c in checks if c.status != "skipped"]
    if not counted:
        return Verdict(decision="INCONCLUSIVE", checks=checks, summary="no check could be run")
    if failed:
        decision: Decision = "FAIL"
        summary = f"failed: {', '.join(failed)}"
        if open_:
            summary += f"; inconclusive: {', '.join(open_)}"
    elif open_:
        decision = "INCONCLUSIVE"
        summary = f"inconclusive: {', '.join(open_)}; no check failed"
    else:
        decision = "PASS"
        summary = f"all {len(counted)} checks passed"
    return Verdict(decision=decision, checks=checks, summary=summary)


def rate_samples_to_decide(
    p: float, op: Literal["<=", ">="], bound: float, confidence: float, *, start: int = 1
) -> int | None:
    """Smallest n at which a Wilson interval at the observed rate ``p`` no longer straddles ``bound``."""

    def decided(n: int) -> bool:
        k = min(n, max(0, round(p * n)))
        low, high = wilson_interval(k, n, confidence)
        return decide_interval(low, high, op, bound) != "inconclusive"

    return _search(decided, start)


def diff_samples_to_decide(
    p_base: float, p_tuned: float, op: Literal["<=", ">="], bound: float, confidence: float, *, start: int = 1
) -> int | None:
    """Smallest n per model at which Newcombe's interval at the observed rates no longer straddles ``bound``."""

    def decided(n: int) -> bool:
        kt = min(n, max(0, round(p_tuned * n)))
        kb = min(n, max(0, round(p_base * n)))
        low, high = newcombe_interval(kt, n, kb, n, confidence)
        return decide_interval(low, high, op, bound) != "inconclusive"

    return _search(decided, start)


def mean_samples_to_decide(observed: float, low: float, high: float, n: int, bound: float) -> int | None:
    """Samples at which a bootstrap half-width, shrinking as ``1/sqrt(n)``, would fall below the distance."""
    distance = abs(observed - bound)
    half = (high - low) / 2
    if distance <= 0 or n < 1:
        return None
    if half <= distance:
        return n
    need = math.ceil(n * (half / distance) ** 2 - 1e-9)
    return need if need <= MAX_SAMPLES else None


def _search(fn: Callable[[int], bool], start: int) -> int | None:
    """Smallest n >= start with ``fn(n)``: doubling, then bisection (the criterion is near-monotone)."""
    n = max(1, start)
    if fn(n):
        return n
    hi = n
    while not fn(hi):
        hi *= 2
        if hi > MAX_SAMPLES:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fn(mid):
            hi = mid
        else:
            lo = mid
    return hi
