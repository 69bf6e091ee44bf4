"""Probes on activations (tunesec.models.probe)."""

from __future__ import annotations

import pytest
import torch

from tunesec.models.probe import LinearProbe, MLPProbe, positive_rate, threshold_at_recall


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


def _rings(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two concentric rings in the first two of 8 features: no linear read-out separates them."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(2 * n, generator=g) * 2 * torch.pi
    radius = torch.cat([torch.full((n,), 1.0), torch.full((n,), 2.0)]) + 0.1 * torch.randn(2 * n, generator=g)
    x = torch.randn(2 * n, 8, generator=g) * 0.5
    x[:, 0], x[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
    return x, torch.cat([torch.ones(n), torch.zeros(n)])


def test_mlp_probe_reads_what_a_linear_probe_cannot() -> None:
    x, y = _rings()
    xt, yt = _rings(seed=1)

    def acc(p: LinearProbe | MLPProbe) -> float:
        return float(((p.scores(xt) > 0).float() == yt).float().mean())

    assert acc(LinearProbe.fit(x, y)) < 0.7
    assert acc(MLPProbe.fit(x, y, hidden=32, epochs=150)) > 0.9


def test_mlp_probe_is_seeded_and_balances_classes() -> None:
    x, y = _two_blobs()
    a = MLPProbe.fit(x, y, hidden=16, epochs=20, seed=3).scores(x)
    b = MLPProbe.fit(x, y, hidden=16, epochs=20, seed=3).scores(x)
    c = MLPProbe.fit(x, y, hidden=16, epochs=20, seed=4).scores(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # 40 positives against 200 negatives: the class weighting puts the threshold near the balanced one
    # (Bayes: 93% of either class on its side), where an unweighted fit gives up recall for the majority class
    x, y = _two_blobs(d=4)
    xi, yi = torch.cat([x[:40], x[200:]]), torch.cat([y[:40], y[200:]])
    xt, yt = _two_blobs(d=4, seed=5)
    mlp = MLPProbe.fit(xi, yi, hidden=16)
    assert positive_rate(mlp.scores(xt[yt == 1])) > 0.85 and positive_rate(mlp.scores(xt[yt == 0])) < 0.2
    assert positive_rate(LinearProbe.fit(xi, yi).scores(xt[yt == 1])) < 0.8


def test_mlp_probe_bad_inputs_are_named() -> None:
    x, y = _two_blobs()
    with pytest.raises(ValueError, match="both classes"):
        MLPProbe.fit(x, torch.zeros(len(x)))
    with pytest.raises(ValueError, match=r"x \[n, d\]"):
        MLPProbe.fit(x, y[:-1])
    with pytest.raises(ValueError, match="dropout"):
        MLPProbe.fit(x, y, dropout=1.0)
