"""Probes on residual-stream activations: how far a model's own features separate two sets of prompts.

A refusal is decided at the first answer token, from the residual stream at the last prompt token. An L2-regularised
logistic regression on those activations (per layer, standardised features) is a cheap upper reference for what
a safety fine-tune can learn from a given training mix: if the best linear read-out of the base model's features,
trained on the mix, cannot put a harmful set above a threshold and a benign look-alike set below it, a small
adapter trained on the same mix is unlikely to (it can build new features, so this is a reference, not a
proof). ``MLPProbe`` (one hidden layer) is the non-linear counterpart: it answers whether the features hold the
separation in a form a linear read-out misses. ``scripts/probe_separability.py`` runs both on the alignment data;
docs/RESULTS.md has the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LinearProbe:
    """A fitted logistic-regression probe on standardised features.

    Attributes:
        mean: Per-feature mean of the training features.
        scale: Per-feature standard deviation (plus a small epsilon).
        weight: Probe weights over the standardised features.
        bias: Probe bias.
    """

    mean: Any
    scale: Any
    weight: Any
    bias: Any

    @classmethod
    def fit(cls, x: Any, y: Any, l2: float = 1e-2, max_iter: int = 200) -> LinearProbe:
        """Fit on features ``x`` ``[n, d]`` and 0/1 labels ``y`` ``[n]`` (full-batch L-BFGS).

        Args:
            x: Training features.
            y: Labels, 1 for the positive class.
            l2: Weight of the squared-norm penalty on ``weight``.
            max_iter: L-BFGS iterations.

        Raises:
            ValueError: ``x`` is not 2-D, the lengths differ, or ``y`` holds only one class.
        """
        import torch

        x, y = _check_xy(x, y)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        xs = (x - mean) / scale
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Any:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(mean=mean, scale=scale, weight=w.detach(), bias=b.detach())

    def scores(self, x: Any) -> Any:
        """Logits ``[n]`` for features ``x`` ``[n, d]`` (positive means the positive class)."""
        import torch

        x = torch.as_tensor(x, dtype=torch.float32)
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def _check_xy(x: Any, y: Any) -> tuple[Any, Any]:
    import torch

    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"probe: expected x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (0 < float(y.sum()) < len(y)):
        raise ValueError("probe: the labels must hold both classes")
    return x, y


@dataclass
class MLPProbe:
    """A fitted one-hidden-layer probe (GELU, dropout while training) on standardised features.

    Trained with AdamW on mini-batches, the two classes weighted equally whatever their sizes, from a seeded
    generator: the same inputs and seed give the same probe.

    Attributes:
        mean: Per-feature mean of the training features.
        scale: Per-feature standard deviation (plus a small epsilon).
        net: The fitted network (in eval mode).
    """

    mean: Any
    scale: Any
    net: Any

    @classmethod
    def fit(
        cls,
        x: Any,
        y: Any,
        hidden: int = 256,
        dropout: float = 0.2,
        weight_decay: float = 1e-2,
        epochs: int = 300,
        batch_size: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> MLPProbe:
        """Fit on features ``x`` ``[n, d]`` and 0/1 labels ``y`` ``[n]``.

        Args:
            x: Training features.
            y: Labels, 1 for the positive class.
            hidden: Width of the hidden layer.
            dropout: Dropout rate on the inputs and the hidden layer while training.
            weight_decay: AdamW's decoupled weight decay.
            epochs: Passes over the training set.
            batch_size: Examples per optimizer step.
            lr: AdamW's learning rate.
            seed: Seed of the initial weights, the batch order and the dropout masks.

        Raises:
            ValueError: ``x`` is not 2-D, the lengths differ, ``y`` holds only one class, or ``dropout`` is
                outside [0, 1).
        """
        import torch

        x, y = _check_xy(x, y)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"probe: dropout must be in [0, 1), got {dropout}")
        gen = torch.Generator().manual_seed(seed)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        xs = (x - mean) / scale
        fc1, fc2 = torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, 1)
        for layer in (fc1, fc2):  # seeded init (nn.Linear's default draws from the global generator)
            bound = layer.in_features**-0.5
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
        net = torch.nn.Sequential(fc1, torch.nn.GELU(), fc2)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        pos_weight = (len(y) - y.sum()) / y.sum()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=gen)
                for start in range(0, len(x), batch_size):
                    idx = order[start : start + batch_size]
                    # dropout masks drawn from the seeded generator as well
                    keep = (torch.rand(len(idx), x.shape[1], generator=gen) >= dropout).float() / (1 - dropout)
                    h = torch.nn.functional.gelu(fc1(xs[idx] * keep))
                    hkeep = (torch.rand(h.shape, generator=gen) >= dropout).float() / (1 - dropout)
                    logits = fc2(h * hkeep).squeeze(-1)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], pos_weight=pos_weight)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        net.eval()
        return cls(mean=mean, scale=scale, net=net)

    def scores(self, x: Any) -> Any:
        """Logits ``[n]`` for features ``x`` ``[n, d]`` (positive means the positive class)."""
        import torch

        x = torch.as_tensor(x, dtype=torch.float32)
        with torch.no_grad():
            return self.net((x - self.mean) / self.scale).squeeze(-1)


def threshold_at_recall(positive_scores: Any, recall: float) -> float:
    """The score threshold above which a share ``recall`` of ``positive_scores`` lies."""
    import torch

    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    s = torch.as_tensor(positive_scores, dtype=torch.float32).sort().values
    k = len(s) - round(recall * len(s))  # the k lowest scores fall below the threshold
    return float(s[k - 1]) if k > 0 else float(s[0]) - 1.0


def positive_rate(scores: Any, threshold: float = 0.0) -> float:
    """Share of ``scores`` strictly above ``threshold``."""
    import torch

    s = torch.as_tensor(scores, dtype=torch.float32)
    return float((s > threshold).float().mean())
