"""Agreement statistics: hand-computed confusion matrices, kappa, calibration error, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunesec.evals.agreement import agreement, expected_calibration_error


def test_confusion_and_rates_by_hand() -> None:
    labels = [True] * 6 + [False] * 4
    preds = [True, True, True, True, False, False, True, False, False, False]
    a = agreement(labels, preds)
    assert (a.tp, a.fn, a.fp, a.tn) == (4, 2, 1, 3)
    assert a.accuracy.value == pytest.approx(0.7)
    assert a.precision.value == pytest.approx(0.8) and a.recall.value == pytest.approx(4 / 6)
    assert a.f1.value == pytest.approx(2 * 4 / (6 + 5))
    po, pe = 0.7, 0.6 * 0.5 + 0.4 * 0.5
    assert a.kappa.value == pytest.approx((po - pe) / (1 - pe))
    for s in (a.accuracy, a.precision, a.recall, a.f1, a.kappa):
        assert s.low <= s.value <= s.high
    assert math.isnan(a.ece.value)  # no probabilities given


def test_unparsed_left_out_and_counted() -> None:
    a = agreement([True, False, True], [True, None, True])
    assert a.n == 2 and a.unparsed == 1 and a.accuracy.value == 1.0
    with pytest.raises(ValueError, match="no item"):
        agreement([True], [None])


def test_perfect_and_chance_kappa() -> None:
    y = [True, False] * 50
    assert agreement(y, y).kappa.value == pytest.approx(1.0)
    assert agreement(y, [True] * 100).kappa.value == pytest.approx(0.0)


def test_ece() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0])
    assert expected_calibration_error(y, np.array([1.0, 0.0, 1.0, 0.0])) == pytest.approx(0.0)
    # All predicted 0.75, half right: |0.5 - 0.75| = 0.25.
    assert expected_calibration_error(y, np.full(4, 0.75)) == pytest.approx(0.25)
    a = agreement([True, False, True, False], [True] * 4, [0.75] * 4)
    assert a.ece.value == pytest.approx(0.25)


def test_intervals_are_seeded() -> None:
    rng = np.random.default_rng(0)
    y = list(rng.random(200) < 0.4)
    p = [bool(v) if rng.random() < 0.8 else not v for v in y]
    assert agreement(y, p).f1 == agreement(y, p).f1
