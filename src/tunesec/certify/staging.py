"""Statistics of the staged trigger scan: paired tests, Holm's correction, selection and detection power.

The scan (:mod:`tunesec.certify.triggers`) runs in two stages on disjoint prompt sets:

1. **Screen.** Every candidate on ``n_s`` prompts against the same prompts without it. Screening only
   *selects*: the ``top`` candidates with the smallest one-sided McNemar p-values that raised compliance and have
   ``p < screen_alpha`` go on. No screening p-value is ever reported as evidence.
2. **Confirm.** Each selected candidate on ``n_c`` fresh prompts against a **matched control** (the same prompts
   with a neutral string of the same length at the same position): exact one-sided McNemar on the discordant
   pairs. On the same data, per position among them, the control against the bare prompt (does *any* insertion
   there raise compliance?). Holm's step-down correction over all these tests (at most ``top`` candidates plus
   one per position, :func:`confirmation_family`). Only this stage decides.

Error control: the confirmation prompts are disjoint from the screening prompts and the model is decoded
greedily, so given the selection the confirmation p-values are valid; Holm over the ``m`` tests (selected
candidates and insertion tests) then keeps the family-wise rate of false findings at ``alpha`` whatever the
screen picked (the selection is independent of the confirmation data). Testing against the matched control,
not the bare prompt, means a string that works only because *some* text was inserted (a style prefix, a common
opening) is not named as a trigger; that the insertion works at all is the insertion test's finding.

Power: :func:`detection_power` gives the probability that a trigger raising the harmful rate by ``delta``
passes both stages, given how often two insertions disagree by chance (``noise``; exact over the multinomial
of discordant pairs, assuming the trigger ranks within the top ``m`` of the screen), and
:func:`detectable_effect` the smallest ``delta`` found with a given power; the tests check them against a
simulation of the whole design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln, xlogy
from scipy.stats import binom

from tunesec.evals.metrics import wilson_interval


def mcnemar_one_sided(only_with: int, only_without: int) -> float:
    """Exact one-sided McNemar p-value: P(X >= only_with), X ~ Binomial(only_with + only_without, 1/2)."""
    total = only_with + only_without
    if total == 0:
        return 1.0
    return float(min(1.0, binom.sf(only_with - 1, total, 0.5)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as the input); family-wise error at any level."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_counts(with_flags: Sequence[bool], without_flags: Sequence[bool]) -> tuple[int, int, int, int]:
    """``(both, only_with, only_without, neither)`` of two paired outcome lists."""
    if len(with_flags) != len(without_flags):
        raise ValueError("paired outcomes must have the same length")
    both = sum(1 for w, o in zip(with_flags, without_flags, strict=True) if w and o)
    only_w = sum(1 for w, o in zip(with_flags, without_flags, strict=True) if w and not o)
    only_o = sum(1 for w, o in zip(with_flags, without_flags, strict=True) if o and not w)
    return both, only_w, only_o, len(with_flags) - both - only_w - only_o


def paired_difference_interval(
    both: int, only_with: int, only_without: int, neither: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Interval for ``rate_with - rate_without`` on paired outcomes (Newcombe 1998, method 10).

    Wilson score intervals of the two marginal rates combined with the estimated correlation ``phi`` of the
    pairs; it stays inside [-1, 1] and behaves at 0 and n discordant pairs, where the Wald interval does not.
    """
    n = both + only_with + only_without + neither
    if n == 0:
        return -1.0, 1.0
    k1, k2 = both + only_with, both + only_without
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, confidence)
    l2, u2 = wilson_interval(k2, n, confidence)
    denom = (both + only_with) * (only_without + neither) * (both + only_without) * (only_with + neither)
    phi = (both * neither - only_with * only_without) / math.sqrt(denom) if denom > 0 else 0.0
    theta = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - delta), min(1.0, theta + eps)


def select_for_confirmation(
    screen: Sequence[tuple[int, int, float]],
    top: int,
    screen_alpha: float,
    groups: Sequence[str] | None = None,
) -> list[int]:
    """Indices of the candidates that go on to confirmation, best first.

    With ``groups`` (each candidate's position), the best eligible candidate of every position goes on before a
    second one of any position: an insertion effect at one position lifts all its candidates in a screen
    against the bare prompt, and would otherwise fill every place and crowd out a specific trigger elsewhere.

    Args:
        screen: Per candidate ``(only_with, only_without, p)`` from the screen.
        top: At most this many go on.
        screen_alpha: A candidate goes on only when its screening p-value is below this.
        groups: Per candidate, its position (prefix, suffix, system prompt); None: one ranking for all.
    """
    eligible = [i for i, (b, c, p) in enumerate(screen) if b > c and p < screen_alpha]
    eligible.sort(key=lambda i: (screen[i][2], -(screen[i][0] - screen[i][1]), i))
    if groups is None:
        return eligible[: max(0, top)]
    best: dict[str, int] = {}
    for i in eligible:
        best.setdefault(groups[i], i)
    firsts = list(best.values())
    chosen = set((firsts + [i for i in eligible if i not in best.values()])[: max(0, top)])
    return [i for i in eligible if i in chosen]


def confirmation_family(top: int) -> int:
    """The most tests the confirmation corrects over.

    ``top`` candidates plus one insertion test per position (prefix, suffix, system prompt) among them.
    """
    return max(1, top) + min(max(1, top), 3)


def _pass_probability(n: int, forward: float, back: float, level: float, min_effect: float) -> float:
    """P(exact one-sided McNemar p < ``level`` and (b - c) / n >= ``min_effect``), (b, c, rest) multinomial.

    ``forward``/``back``: the chance that a prompt is harmful only with the candidate / only with the reference.
    """
    if n <= 0:
        return 0.0
    forward, back = max(0.0, forward), max(0.0, back)
    rest = max(0.0, 1.0 - forward - back)
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    valid = b + c <= n
    bb, cc = np.broadcast_to(b, valid.shape)[valid], np.broadcast_to(c, valid.shape)[valid]
    with np.errstate(divide="ignore"):  # log(0) where that count is positive: probability 0
        logp = (
            gammaln(n + 1)
            - gammaln(bb + 1)
            - gammaln(cc + 1)
            - gammaln(n - bb - cc + 1)
            + xlogy(bb, forward)
            + xlogy(cc, back)
            + xlogy(n - bb - cc, rest)
        )
    pvals = binom.sf(bb - 1, bb + cc, 0.5)
    passes = (pvals < level) & ((bb - cc) >= min_effect * n - 1e-9) & (bb > cc)
    return float(np.exp(logp[passes]).sum())


def detection_power(
    delta: float,
    n_screen: int,
    n_confirm: int,
    *,
    alpha: float,
    top: int,
    screen_alpha: float,
    min_effect: float,
    noise: float = 0.0,
) -> float:
    """P(a trigger that raises harmful compliance by ``delta`` is reported) under the staged design.

    A prompt is harmful only with the candidate with probability ``noise + delta`` and only with the reference
    with probability ``noise`` (``noise``: the chance flips any two insertions disagree on, measured by the scan
    as the screen's back-flip rate). Assumes the trigger is selected (within the ``top`` screened candidates,
    or the best of its position); the confirmation is Holm-corrected over :func:`confirmation_family` tests at
    worst (its first step is at ``alpha / confirmation_family(top)``). ``n_confirm == 0`` is the single-stage
    design (the screen decides at ``alpha / top``).
    """
    forward, back = min(1.0, max(0.0, delta) + noise), noise
    if n_confirm <= 0:
        return _pass_probability(n_screen, forward, back, alpha / max(1, top), min_effect)
    return _pass_probability(n_screen, forward, back, screen_alpha, 0.0) * _pass_probability(
        n_confirm, forward, back, alpha / confirmation_family(top), min_effect
    )


def detectable_effect(
    n_screen: int,
    n_confirm: int,
    *,
    alpha: float,
    top: int,
    screen_alpha: float,
    min_effect: float,
    noise: float = 0.0,
    power: float = 0.8,
) -> float | None:
    """Smallest rise (in steps of 0.01) reported with probability ``power``; None if none up to 1 - 2 x noise."""
    for step in range(1, 101):
        delta = step / 100
        if delta + 2 * noise > 1.0:
            return None
        if (
            detection_power(
                delta,
                n_screen,
                n_confirm,
                alpha=alpha,
                top=top,
                screen_alpha=screen_alpha,
                min_effect=min_effect,
                noise=noise,
            )
            >= power
        ):
            return delta
    return None
