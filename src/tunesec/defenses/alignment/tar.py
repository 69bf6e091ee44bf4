"""``tar``: tamper-resistant safeguards by meta-learning against simulated attackers (Tamirisa et al. 2024, TAR).

TAR trains the model so that a fine-tuning attacker who starts from it cannot recover the harmful behaviour: each
outer step simulates an attack (K inner fine-tuning steps on harmful data, from the current weights, with a
sampled learning rate), measures at the attacked weights a *tamper-resistance* loss on held-out harmful data, and
moves the real weights so that this loss stays good after the attack (first-order meta-gradient, as MAML's
first-order form). A retain loss and a representation anchor to the starting model keep it useful. Official code:
rishub-tamirisa/tamper-resistance@19de233 ``modules/training.py::tar_training_loop``:

    for each outer step:
        snapshot w; sample the adversary's learning rate
        K inner AdamW steps on CE(forget) from w; every `meta_every` inner steps k:
            meta += 4.0 * exp(0.0625 (k - K + 1)) * grad L_TR(w_k; held-out forget batch)
        restore w
        grad = meta + grad [CE(retain) + anchor * mean_l |h_l(w) - h_l(w_start)|]

Tamper-resistance loss: the entropy form (``L_TR = -entropy`` of the next-token distribution at the held-out
harmful answers' positions): after an attack the model should stay uncertain on harmful answers.

As built here: the retain loss is the shipped aligned recipe's training batch (its refusals and helpful answers);
forget and held-out forget data are two disjoint halves of the harmful pairs (``judge-pku`` unsafe rows, disjoint
from the attacks' data); the start model for the anchor is the weights before the first step (saved to the run
directory for resume). CPU-sized (the paper: K = 64 inner steps, a meta-gradient every 4th, 750 outer steps on 8
A100s, ~81 forward-backward passes per step): K = 2 inner steps with one meta-gradient at the last, adversary
learning rates {1e-4, 5e-4, 1e-3} (the LoRA attack's 5e-4 in the middle; the paper's {2e-6, 2e-5, 4e-5} are for
full fine-tuning), about 4.3 passes per step. The recipe's 155 steps project to about 36 minutes on the 2-core machine
of 2026-12-02 (8-step benchmark) but ran at 42 s per step (about 110 minutes) on an AVX2-only one (docs/DEFENSES.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field, field_validator

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, GradientTermHook, HookContext, TrainingHook

HELD_OUT = "harmful-heldout"
REFERENCE_FILE = "tar_reference.safetensors"


class TARConfig(HookedAlignmentConfig):
    """TAR: first-order meta-learning against simulated harmful fine-tuning, CPU-sized."""

    inner_steps: int = Field(2, ge=1, le=256, description="K: the simulated attacker's fine-tuning steps.")
    meta_every: int = Field(2, ge=1, description="Take the tamper-resistance gradient every this many inner steps.")
    adversary_lrs: list[float] = Field(
        default_factory=lambda: [1e-4, 5e-4, 1e-3], description="Learning rates the attacker's AdamW is drawn from."
    )
    tr_scale: float = Field(4.0, ge=0.0, le=1000.0, description="Scale of the tamper-resistance meta-gradient.")
    tr_decay: float = Field(
        0.0625, ge=0.0, le=10.0, description="w_k = exp(tr_decay (k - K + 1)) weighs later steps more."
    )
    anchor: float = Field(1.0, ge=0.0, le=1000.0, description="Weight of the representation anchor to the start model.")

    @field_validator("adversary_lrs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(lr <= 0 for lr in v):
            raise ValueError("give at least one learning rate, each > 0")
        return v


def entropy_loss(logits: Any) -> Any:
    """``-entropy`` of the next-token distributions (rows of ``logits``), averaged: TAR's entropy-form L_TR."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * logp).sum(-1).mean()


def answer_logits(model: Any, batch: Batch) -> Any:
    """Logits at the positions that predict the batch's answer tokens."""
    from tunesec.training.collate import IGNORE_INDEX

    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, :-1][keep]


class TamperResistance(GradientTermHook):
    """TAR's simulated attacks, meta-gradient and representation anchor as a training hook."""

    name = "tar"
    needs_hidden_states = True

    def __init__(
        self,
        inner_steps: int = 2,
        meta_every: int = 2,
        adversary_lrs: Sequence[float] = (1e-4, 5e-4, 1e-3),
        tr_scale: float = 4.0,
        tr_decay: float = 0.0625,
        anchor: float = 1.0,
    ) -> None:
        self.k, self.every, self.lrs = inner_steps, meta_every, list(adversary_lrs)
        self.scale, self.decay, self.anchor = tr_scale, tr_decay, anchor
        self.reference: Any = None
        self._ref_hidden: list[Any] | None = None
        self.last: dict[str, float] = {}

    def pop_metrics(self) -> dict[str, float]:
        """Measured since the last call: L_TR at the attacked weights, the adversary's learning rate, the anchor."""
        out, self.last = self.last, {}
        return out

    def setup(self, ctx: HookContext) -> None:
        """Streams over the forget pairs (the attacker's) and the held-out forget pairs (L_TR's)."""
        self.ctx = ctx
        self._forget: Iterator[Batch] = ctx.batches(HARMFUL, seed=ctx.config.seed + 7)
        self._held_out: Iterator[Batch] = ctx.batches(HELD_OUT, seed=ctx.config.seed + 8)

    def _start(self, model: Any) -> Any:
        from tunesec.training.steps import WeightSnapshot, trainable_parameters

        if self.reference is None:
            snap = WeightSnapshot(trainable_parameters(model))
            path = self.ctx.out_dir / REFERENCE_FILE
            if path.is_file():
                snap.load(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                snap.save(path)
            self.reference = snap
        return self.reference

    def attack(self, model: Any, params: list[Any], lr: float) -> list[Any]:
        """K AdamW steps on forget batches from the current weights; the weighted sum of the L_TR gradients.

        The weights are left at the attacked point; the caller restores them.
        """
        import torch

        from tunesec.training.steps import gradient

        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        meta = [torch.zeros_like(p) for p in params]
        for k in range(self.k):
            g = gradient(self.ctx.lm_loss(model, next(self._forget)), params)
            with torch.no_grad():
                for p, gi, mi, vi in zip(params, g, m, v, strict=True):
                    mi.mul_(b1).add_(gi, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(gi, gi, value=1 - b2)
                    step = (mi / (1 - b1 ** (k + 1))) / ((vi / (1 - b2 ** (k + 1))).sqrt() + eps)
                    p.sub_(lr * step)
            if (k + 1) % self.every == 0:
                weight = self.scale * math.exp(self.decay * (k - self.k + 1))
                tr = entropy_loss(answer_logits(model, next(self._held_out)))
                self.last["tamper_loss"] = float(tr.detach())
                for acc, gi in zip(meta, gradient(tr, params), strict=True):
                    acc.add_(gi, alpha=weight)
        return meta

    def before_step(self, model: Any, inputs: Batch) -> None:
        """The simulated attack (weights restored after it); the start model's hidden states for the anchor."""
        import torch

        from tunesec.training.steps import step_rng, trainable_parameters

        start = self._start(model)
        params = [p for _, p in trainable_parameters(model)]
        lr = step_rng(self.ctx.config.seed, self.ctx.clock, "tar-lr").choice(self.lrs)
        saved = [p.detach().clone() for p in params]
        try:
            self.keep_term(params, self.attack(model, params, lr))
        finally:
            with torch.no_grad():  # the simulated attack never reaches the real weights
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        self.last["adversary_lr"] = lr
        if self.anchor > 0:
            kwargs = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
            with torch.no_grad(), start.swapped_in():
                out = model(input_ids=inputs["input_ids"], output_hidden_states=True, use_cache=False, **kwargs)
            self._ref_hidden = [h.detach() for h in out.hidden_states[1:]]

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> Any:
        """``anchor * mean over layers of the mean token distance |h_l - h_l(start)|`` on the retain batch."""
        import torch

        if self.anchor <= 0 or self._ref_hidden is None:
            return None
        dist = [(h - r).norm(dim=-1).mean() for h, r in zip(outputs.hidden_states[1:], self._ref_hidden, strict=True)]
        self._ref_hidden = None
        loss = torch.stack(dist).mean()
        self.last["anchor"] = float(loss.detach())
        return self.anchor * loss


@register(
    "defense",
    "tar",
    description="Tamper-resistant training: meta-learn against simulated harmful fine-tuning (K inner steps).",
    stage="alignment",
    paper="Tamirisa et al. 2024, Tamper-Resistant Safeguards for Open-Weight LLMs, arXiv 2408.00761",
    threat_model="open-weights",
    needs_harmful=True,
)
class TAR(HookedAlignment):
    """TAR (see the module docstring)."""

    name = "tar"
    config_class = TARConfig
    needs_harmful = True

    def extra_datasets(self, harmful: Sequence[Example], data: Sequence[Example]) -> dict[str, list[Example]]:
        """Two disjoint halves of the harmful pairs: the attacker's and the tamper-resistance loss's."""
        half = len(harmful) // 2
        return {HARMFUL: list(harmful[:half]), HELD_OUT: list(harmful[half:])}

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: simulated attacks, meta-gradient, anchor."""
        assert isinstance(self.config, TARConfig)
        c = self.config
        return [TamperResistance(c.inner_steps, c.meta_every, c.adversary_lrs, c.tr_scale, c.tr_decay, c.anchor)]
