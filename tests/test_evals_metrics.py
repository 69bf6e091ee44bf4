"""Interval functions against hand-computed references (formulas written out here, not taken from the code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunesec.evals.metrics import (
    bootstrap_diff_interval,
    bootstrap_interval,
    diff_means,
    diff_rates,
    mean_metric,
    newcombe_interval,
    rate_metric,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


def wilson_reference(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


@pytest.mark.parametrize("k", [0, 5, 10])
def test_wilson_matches_formula(k: int) -> None:
    low, high = wilson_interval(k, 10)
    ref_low, ref_high = wilson_reference(k, 10)
    assert low == pytest.approx(max(0.0, ref_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, ref_high), abs=1e-12)


def test_wilson_known_values() -> None:
    # 0/10: upper = z^2 / (n + z^2); 10/10: lower = n / (n + z^2); 5/10: the textbook (0.2366, 0.7634).
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z95**2), abs=1e-12), 1.0)
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)


def test_wilson_confidence_level_changes_width() -> None:
    z90 = 1.6448536269514722
    low, high = wilson_interval(3, 20, confidence=0.90)
    ref = wilson_reference(3, 20, z90)
    assert (low, high) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert high - low < wilson_interval(3, 20)[1] - wilson_interval(3, 20)[0]


@pytest.mark.parametrize(("k", "n"), [(1, 0), (-1, 5), (6, 5)])
def test_wilson_rejects_bad_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_newcombe_reference_example() -> None:
    # Newcombe (1998), table II example (56/70 vs 48/80): method 10 gives 0.0524 to 0.3339.
    low, high = newcombe_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    # The same from the Wilson limits written out here.
    p1, p2 = 56 / 70, 48 / 80
    l1, u1 = wilson_reference(56, 70)
    l2, u2 = wilson_reference(48, 80)
    assert low == pytest.approx(p1 - p2 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2))
    assert high == pytest.approx(p1 - p2 + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def test_newcombe_extremes_stay_in_range() -> None:
    low, high = newcombe_interval(10, 10, 0, 10)
    assert 0 < low < 1 and high == 1.0
    low, high = newcombe_interval(0, 10, 0, 10)
    assert low < 0 < high


def test_bootstrap_is_seeded_and_close_to_normal_theory() -> None:
    rng = np.random.default_rng(123)
    values = rng.normal(2.0, 1.0, size=400).tolist()
    a = bootstrap_interval(values, seed=7)
    assert a == bootstrap_interval(values, seed=7)
    assert a != bootstrap_interval(values, seed=8)
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    assert a[0] == pytest.approx(mean - Z95 * se, abs=0.25 * se)
    assert a[1] == pytest.approx(mean + Z95 * se, abs=0.25 * se)


def test_bootstrap_of_constant_is_degenerate() -> None:
    assert bootstrap_interval([0.5] * 30) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_bootstrap_diff_covers_true_shift() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 300).tolist()
    b = rng.normal(0.5, 1.0, 300).tolist()
    low, high = bootstrap_diff_interval(a, b)
    assert low < 0.5 < high
    assert low > 0  # a shift of half a standard deviation with 300 samples each is detected
    d = diff_means("m", a, b)
    assert d.significant and d.diff == pytest.approx(float(np.mean(b) - np.mean(a)))


def test_rate_metric_with_categories() -> None:
    outcomes = [True, True, False, False, True, False]
    cats = ["x", "x", "x", "y", "y", None]
    m = rate_metric("r", outcomes, cats)
    assert m is not None
    assert (m.k, m.n, m.value, m.method) == (3, 6, 0.5, "wilson")
    assert (m.ci_low, m.ci_high) == wilson_interval(3, 6)
    assert set(m.per_category) == {"x", "y"}
    assert (m.per_category["x"].k, m.per_category["x"].n) == (2, 3)
    assert (m.per_category["y"].k, m.per_category["y"].n) == (1, 2)
    assert rate_metric("r", []) is None


def test_mean_metric() -> None:
    m = mean_metric("s", [0.0, 0.5, 1.0, 1.0], ["a", "a", "b", "b"])
    assert m is not None and m.k is None and m.method == "bootstrap"
    assert m.value == pytest.approx(0.625)
    assert m.ci_low <= m.value <= m.ci_high
    assert m.per_category["b"].value == 1.0


def test_diff_rates_flags_significance() -> None:
    a = rate_metric("harmful_rate", [True] * 2 + [False] * 38)
    b = rate_metric("harmful_rate", [True] * 30 + [False] * 10)
    assert a is not None and b is not None
    d = diff_rates("harmful_rate", a, b)
    assert d.diff == pytest.approx(0.7) and d.method == "newcombe" and d.significant
    assert (d.ci_low, d.ci_high) == newcombe_interval(30, 40, 2, 40)
    same = diff_rates("harmful_rate", a, a)
    assert not same.significant and same.diff == 0
