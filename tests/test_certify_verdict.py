"""Verdict logic: interval against bound, overall decision, samples that would decide an open check."""

from __future__ import annotations

from tunesec.certify.verdict import (
    CheckResult,
    combine,
    decide_interval,
    diff_samples_to_decide,
    mean_samples_to_decide,
    rate_samples_to_decide,
)
from tunesec.evals.metrics import newcombe_interval, wilson_interval


def test_decide_interval_at_the_boundary() -> None:
    assert decide_interval(-0.02, 0.05, "<=", 0.05) == "pass"  # upper end exactly on the bound passes
    assert decide_interval(-0.02, 0.0500001, "<=", 0.05) == "inconclusive"
    assert decide_interval(0.05, 0.2, "<=", 0.05) == "inconclusive"  # lower end on the bound: not beyond
    assert decide_interval(0.0500001, 0.2, "<=", 0.05) == "fail"
    assert decide_interval(0.5, 0.9, ">=", 0.5) == "pass"
    assert decide_interval(0.49, 0.9, ">=", 0.5) == "inconclusive"
    assert decide_interval(0.1, 0.4999, ">=", 0.5) == "fail"


def _c(name: str, status: str) -> CheckResult:
    return CheckResult(name=name, status=status)  # type: ignore[arg-type]


def test_combine() -> None:
    assert combine([_c("a", "pass"), _c("b", "skipped")]).decision == "PASS"
    v = combine([_c("a", "pass"), _c("b", "inconclusive")])
    assert v.decision == "INCONCLUSIVE" and v.exit_code == 3 and "b" in v.summary
    v = combine([_c("a", "fail"), _c("b", "inconclusive")])
    assert v.decision == "FAIL" and v.exit_code == 1
    assert combine([_c("a", "pass")]).exit_code == 0
    assert combine([_c("a", "skipped")]).decision == "INCONCLUSIVE"


def test_rate_samples_to_decide_is_the_first_deciding_n() -> None:
    # observed 0.6 vs a bound of >= 0.5: straddles at n=30
    low, high = wilson_interval(18, 30)
    assert decide_interval(low, high, ">=", 0.5) == "inconclusive"
    n = rate_samples_to_decide(0.6, ">=", 0.5, 0.95, start=30)
    assert n is not None and n > 30
    lo_n, _ = wilson_interval(round(0.6 * n), n)
    lo_prev, _ = wilson_interval(round(0.6 * (n - 1)), n - 1)
    assert lo_n >= 0.5 > lo_prev
    # about z^2 p q / d^2 = 1.96^2 * 0.24 / 0.01 = 92 (Wilson needs a few more)
    assert 85 <= n <= 110


def test_diff_samples_to_decide() -> None:
    # base 0.10, tuned 0.12: change +0.02 against "<= +0.05" is inconclusive at n=60
    low, high = newcombe_interval(round(0.12 * 60), 60, round(0.10 * 60), 60)
    assert decide_interval(low, high, "<=", 0.05) == "inconclusive"
    n = diff_samples_to_decide(0.10, 0.12, "<=", 0.05, 0.95, start=60)
    assert n is not None
    lo, hi = newcombe_interval(round(0.12 * n), n, round(0.10 * n), n)
    assert hi <= 0.05
    # Wald approximation: 1.96^2 (0.09 + 0.1056) / 0.03^2 = 835
    assert 700 < n < 1000
    # a change sitting exactly on the bound never decides
    assert diff_samples_to_decide(0.10, 0.15, "<=", 0.05, 0.95, start=60) is None


def test_mean_samples_to_decide() -> None:
    assert mean_samples_to_decide(0.1, 0.0, 0.2, 100, 0.15) == 400
    assert mean_samples_to_decide(0.15, 0.1, 0.2, 100, 0.15) is None
