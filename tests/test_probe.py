"""Linear probes on activations (tunesec.models.probe)."""

from __future__ import annotations

import pytest
import torch

from tunesec.models.probe import LinearProbe, positive_rate, threshold_at_recall


def _two_blobs(n: int = 200, d: int = 16, gap: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[3] = gap
    pos = torch.randn(n, d, generator=g) + direction / 2
    neg = torch.randn(n, d, generator=g) - direction / 2
    # a large, uninformative offset and scale on other features: standardisation must absorb them
    x = torch.cat([pos, neg]) * torch.linspace(1, 50, d) + 100.0
    return x, torch.cat([torch.ones(n), torch.zeros(n)])


def test_probe_separates_two_blobs_and_generalises() -> None:
    x, y = _two_blobs()
    probe = LinearProbe.fit(x, y)
    train_acc = float(((probe.scores(x) > 0).float() == y).float().mean())
    xt, yt = _two_blobs(seed=1)
    test_acc = float(((probe.scores(xt) > 0).float() == yt).float().mean())
    # a gap of 3 standard deviations along one axis: the Bayes accuracy is Phi(1.5) = 0.933
    assert train_acc > 0.9 and test_acc > 0.88
    # the informative feature carries the largest weight
    assert int(probe.weight.abs().argmax()) == 3


def test_probe_on_noise_is_near_chance() -> None:
    x, y = _two_blobs(gap=0.0)
    xt, yt = _two_blobs(gap=0.0, seed=2)
    probe = LinearProbe.fit(x, y, l2=1.0)
    assert 0.35 < float(((probe.scores(xt) > 0).float() == yt).float().mean()) < 0.65


def test_stronger_l2_shrinks_the_weights() -> None:
    x, y = _two_blobs()
    assert LinearProbe.fit(x, y, l2=1.0).weight.norm() < LinearProbe.fit(x, y, l2=1e-3).weight.norm()


def test_threshold_at_recall_and_positive_rate() -> None:
    s = torch.arange(10, dtype=torch.float32)  # 0..9
    thr = threshold_at_recall(s, 0.8)
    assert positive_rate(s, thr) == pytest.approx(0.8)
    assert positive_rate(s, threshold_at_recall(s, 1.0)) == 1.0
    assert positive_rate(s, threshold_at_recall(s, 0.1)) == pytest.approx(0.1)
    assert positive_rate(torch.tensor([-1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="recall"):
        threshold_at_recall(s, 0.0)


def test_bad_inputs_are_named() -> None:
    x, y = _two_blobs()
    with pytest.raises(ValueError, match="both classes"):
        LinearProbe.fit(x, torch.ones(len(x)))
    with pytest.raises(ValueError, match=r"x \[n, d\]"):
        LinearProbe.fit(x[:, 0], y)
    with pytest.raises(ValueError, match=r"x \[n, d\]"):
        LinearProbe.fit(x, y[:-1])
