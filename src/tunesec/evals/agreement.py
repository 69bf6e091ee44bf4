"""Agreement of a judge with labels: accuracy, precision, recall, F1, Cohen's kappa, calibration, with intervals.

Used by ``tunesec judge --labels`` and by ``scripts/train_judge.py`` / ``benchmarks/judges.py`` for the
per-source tables. Accuracy, precision and recall are proportions with Wilson 95% intervals; F1, kappa and the
expected calibration error (ECE, 10 equal-width bins of the predicted probability) get percentile bootstrap
intervals over items (2000 resamples, seeded). Items whose judgement is missing (unparsed) are counted apart and
left out of every rate, as evaluations count them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tunesec.evals.metrics import DEFAULT_RESAMPLES, DEFAULT_SEED, wilson_interval

Interval = tuple[float, float]


@dataclass(frozen=True)
class Stat:
    """A value with its 95% interval (``nan`` when undefined, e.g. precision with no positive prediction)."""

    value: float
    low: float
    high: float

    def fmt(self, pct: bool = True) -> str:
        """``"91.2 [89.0, 93.1]"`` (percent) or ``"0.82 [0.78, 0.86]"``."""
        if np.isnan(self.value):
            return "n/a"
        if pct:
            return f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class Agreement:
    """Agreement of binary predictions with binary labels."""

    n: int
    unparsed: int
    positives: int
    tp: int
    fp: int
    fn: int
    tn: int
    accuracy: Stat
    precision: Stat
    recall: Stat
    f1: Stat
    kappa: Stat
    ece: Stat

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _rate(k: int, n: int) -> Stat:
    if n == 0:
        return Stat(float("nan"), float("nan"), float("nan"))
    lo, hi = wilson_interval(k, n)
    return Stat(k / n, lo, hi)


def _f1(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    tp = (y & p).sum(axis=-1)
    denom = y.sum(axis=-1) + p.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def _kappa(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    n = y.shape[-1]
    po = (y == p).sum(axis=-1) / n
    py, pp = y.sum(axis=-1) / n, p.sum(axis=-1) / n
    pe = py * pp + (1 - py) * (1 - pp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pe < 1, (po - pe) / np.where(pe < 1, 1 - pe, 1), np.nan)


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> np.ndarray:
    """ECE over the last axis: the count-weighted mean |accuracy - confidence| over equal-width bins of P(y=1)."""
    edges = np.clip((prob * bins).astype(int), 0, bins - 1)
    n = y.shape[-1]
    total = np.zeros(y.shape[:-1])
    for b in range(bins):
        m = edges == b
        cnt = m.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs((y * m).sum(axis=-1) - (prob * m).sum(axis=-1))
        total = total + np.where(cnt > 0, gap, 0.0)
    return np.asarray(total / n)


def _boot(fn: Any, y: np.ndarray, *args: np.ndarray, resamples: int, seed: int) -> Stat:
    value = float(fn(y, *args))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y.size, size=(resamples, y.size))
    draws = fn(y[idx], *(a[idx] for a in args))
    draws = draws[~np.isnan(draws)]
    if draws.size == 0 or np.isnan(value):
        return Stat(value, float("nan"), float("nan"))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return Stat(value, float(lo), float(hi))


def agreement(
    labels: Sequence[bool],
    predictions: Sequence[bool | None],
    probabilities: Sequence[float | None] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Agreement:
    """Agreement of ``predictions`` (``None`` = unparsed) with ``labels``; ECE needs ``probabilities``.

    Raises:
        ValueError: The sequences differ in length, or no item has a prediction.
    """
    if len(labels) != len(predictions) or (probabilities is not None and len(probabilities) != len(labels)):
        raise ValueError("labels, predictions and probabilities differ in length")
    keep = [i for i, p in enumerate(predictions) if p is not None]
    if not keep:
        raise ValueError("no item has a prediction")
    y = np.array([bool(labels[i]) for i in keep])
    p = np.array([bool(predictions[i]) for i in keep])
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    fn, tn = int((y & ~p).sum()), int((~y & ~p).sum())
    n = len(keep)
    if probabilities is not None and all(probabilities[i] is not None for i in keep):
        prob = np.array([float(probabilities[i]) for i in keep])  # type: ignore[arg-type]
        ece = _boot(expected_calibration_error, y.astype(float), prob, resamples=resamples, seed=seed)
    else:
        ece = Stat(float("nan"), float("nan"), float("nan"))
    return Agreement(
        n=n,
        unparsed=len(predictions) - n,
        positives=int(y.sum()),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        accuracy=_rate(tp + tn, n),
        precision=_rate(tp, tp + fp),
        recall=_rate(tp, tp + fn),
        f1=_boot(_f1, y, p, resamples=resamples, seed=seed),
        kappa=_boot(_kappa, y, p, resamples=resamples, seed=seed),
        ece=ece,
    )
