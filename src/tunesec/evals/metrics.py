"""Metrics with confidence intervals: Wilson (rates), percentile bootstrap (means), Newcombe (differences).

Every number tunesec reports carries an interval, because safety evaluations run on a few hundred prompts and
a point estimate alone invites over-reading (garak's evaluators and the certification policy both decide on
intervals, not points).

- Rates (refusal rate, harmful-compliance rate, accuracy): the Wilson score interval (Wilson 1927), which
  keeps its coverage near 0 and 1 where the normal ("Wald") interval collapses to a point.
- Means (StrongREJECT score): the percentile bootstrap (Efron & Tibshirani 1993), seeded, 2000 resamples.
- The difference of two independent rates: Newcombe's hybrid score interval, method 10 of Newcombe (1998),
  "Interval estimation for the difference between independent proportions", Statistics in Medicine 17:873-890.
- The difference of two means: independent percentile bootstrap of each sample's mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Method = Literal["wilson", "bootstrap", "newcombe"]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


class MetricValue(BaseModel):
    """One metric: point value, confidence interval and per-category breakdown.

    Attributes:
        name: Metric name, e.g. ``harmful_rate``.
        value: Point estimate (a rate in [0, 1] or a mean).
        ci_low: Lower end of the confidence interval.
        ci_high: Upper end of the confidence interval.
        n: Number of samples the value was computed on.
        k: Successes, for rates (``None`` for means).
        method: How the interval was computed.
        confidence: Confidence level of the interval.
        per_category: The same metric computed within each category (these have no further breakdown).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    k: int | None = None
    method: Method
    confidence: float = DEFAULT_CONFIDENCE
    per_category: dict[str, MetricValue] = Field(default_factory=dict)

    @property
    def is_rate(self) -> bool:
        """True when the value is a proportion ``k / n``."""
        return self.k is not None


class MetricDiff(BaseModel):
    """The change of one metric from run A to run B (``b - a``), with an interval for the difference.

    Attributes:
        name: Metric name.
        a: Value in run A.
        b: Value in run B.
        diff: ``b - a``.
        ci_low: Lower end of the interval for ``b - a``.
        ci_high: Upper end of the interval for ``b - a``.
        method: ``newcombe`` for rates, ``bootstrap`` for means.
        confidence: Confidence level.
        significant: The interval excludes 0.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    method: Method
    confidence: float = DEFAULT_CONFIDENCE
    significant: bool


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n``.

    Args:
        k: Successes, ``0 <= k <= n``.
        n: Trials, ``n >= 1``.
        confidence: Two-sided confidence level.

    Returns:
        ``(low, high)`` within [0, 1]; exactly 0 when ``k == 0`` and exactly 1 when ``k == n``.
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    z = _z(confidence)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values``.

    Args:
        values: The sample (at least one value).
        confidence: Two-sided confidence level.
        n_resamples: Bootstrap resamples (2000 by default, Efron & Tibshirani's advice for percentile CIs).
        seed: Seed of the resampling generator, so the interval is reproducible.

    Returns:
        ``(low, high)`` percentiles of the resampled means.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    _z(confidence)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def newcombe_interval(
    k1: int, n1: int, k2: int, n2: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Newcombe's hybrid score interval for ``p1 - p2`` of two independent proportions (method 10, 1998).

    Args:
        k1: Successes in sample 1.
        n1: Trials in sample 1.
        k2: Successes in sample 2.
        n2: Trials in sample 2.
        confidence: Two-sided confidence level.

    Returns:
        ``(low, high)`` for ``k1/n1 - k2/n2``, within [-1, 1].
    """
    p1, p2 = k1 / n1 if n1 else 0.0, k2 / n2 if n2 else 0.0
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def bootstrap_diff_interval(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval for ``mean(b) - mean(a)`` of two independent samples.

    Args:
        a: First sample.
        b: Second sample.
        confidence: Two-sided confidence level.
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling generator.

    Returns:
        ``(low, high)`` for ``mean(b) - mean(a)``.
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("bootstrap_diff_interval needs at least one value in each sample")
    _z(confidence)
    rng = np.random.default_rng(seed)
    ma = xa[rng.integers(0, xa.size, size=(n_resamples, xa.size))].mean(axis=1)
    mb = xb[rng.integers(0, xb.size, size=(n_resamples, xb.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(mb - ma, [alpha, 1.0 - alpha])
    return float(low), float(high)


def rate_metric(
    name: str,
    outcomes: Sequence[bool],
    categories: Sequence[str | None] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> MetricValue | None:
    """A rate with its Wilson interval, and per category when ``categories`` is given.

    Args:
        name: Metric name.
        outcomes: One boolean per counted sample (excluded samples are left out by the caller).
        categories: The category of each outcome (same length), or ``None``.
        confidence: Confidence level.

    Returns:
        The metric, or ``None`` when there are no outcomes.
    """
    if not outcomes:
        return None
    k, n = sum(bool(o) for o in outcomes), len(outcomes)
    low, high = wilson_interval(k, n, confidence)
    per_cat: dict[str, MetricValue] = {}
    for cat, idx in _group(categories, n).items():
        sub = rate_metric(name, [outcomes[i] for i in idx], None, confidence)
        if sub is not None:
            per_cat[cat] = sub
    return MetricValue(
        name=name,
        value=k / n,
        ci_low=low,
        ci_high=high,
        n=n,
        k=k,
        method="wilson",
        confidence=confidence,
        per_category=per_cat,
    )


def mean_metric(
    name: str,
    values: Sequence[float],
    categories: Sequence[str | None] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> MetricValue | None:
    """A mean with its percentile-bootstrap interval, and per category when ``categories`` is given.

    Args:
        name: Metric name.
        values: One value per counted sample.
        categories: The category of each value (same length), or ``None``.
        confidence: Confidence level.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        The metric, or ``None`` when there are no values.
    """
    if not values:
        return None
    low, high = bootstrap_interval(values, confidence, n_resamples, seed)
    per_cat: dict[str, MetricValue] = {}
    for cat, idx in _group(categories, len(values)).items():
        sub = mean_metric(name, [values[i] for i in idx], None, confidence, n_resamples, seed)
        if sub is not None:
            per_cat[cat] = sub
    return MetricValue(
        name=name,
        value=float(np.mean(np.asarray(values, dtype=float))),
        ci_low=low,
        ci_high=high,
        n=len(values),
        method="bootstrap",
        confidence=confidence,
        per_category=per_cat,
    )


def diff_rates(name: str, a: MetricValue, b: MetricValue) -> MetricDiff:
    """Change of a rate from ``a`` to ``b`` with Newcombe's interval for ``b - a``.

    Args:
        name: Metric name.
        a: The rate in run A (needs ``k`` and ``n``).
        b: The rate in run B.
    """
    if a.k is None or b.k is None:
        raise ValueError(f"{name}: diff_rates needs rates (k and n) in both runs")
    low, high = newcombe_interval(b.k, b.n, a.k, a.n, a.confidence)
    return MetricDiff(
        name=name,
        a=a.value,
        b=b.value,
        diff=b.value - a.value,
        ci_low=low,
        ci_high=high,
        method="newcombe",
        confidence=a.confidence,
        significant=low > 0 or high < 0,
    )


def diff_means(
    name: str,
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> MetricDiff:
    """Change of a mean from sample ``a`` to sample ``b`` with a bootstrap interval for ``b - a``.

    Args:
        name: Metric name.
        a: Per-sample values of run A.
        b: Per-sample values of run B.
        confidence: Confidence level.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.
    """
    low, high = bootstrap_diff_interval(a, b, confidence, n_resamples, seed)
    ma, mb = float(np.mean(np.asarray(a, dtype=float))), float(np.mean(np.asarray(b, dtype=float)))
    return MetricDiff(
        name=name,
        a=ma,
        b=mb,
        diff=mb - ma,
        ci_low=low,
        ci_high=high,
        method="bootstrap",
        confidence=confidence,
        significant=low > 0 or high < 0,
    )


def _group(categories: Sequence[str | None] | None, n: int) -> dict[str, list[int]]:
    if categories is None:
        return {}
    if len(categories) != n:
        raise ValueError(f"got {len(categories)} categories for {n} values")
    groups: dict[str, list[int]] = {}
    for i, cat in enumerate(categories):
        if cat is not None and cat != "":
            groups.setdefault(str(cat), []).append(i)
    return groups
