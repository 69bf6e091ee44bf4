"""``booster``: attenuate the harmful-perturbation loss reduction (Huang et al. 2024, arXiv 2409.01586).

A harmful fine-tuning step lowers the harmful loss ``h``. Booster aligns with a regulariser that makes that
reduction small: ``min f(w) + lambda * (h(w) - h(w - alpha * grad h(w) / ||grad h(w)||))``, where ``f`` is
the alignment loss and ``h`` the loss on harmful (request, harmful answer) pairs. First order, as in the
official code (git-disl/Booster@6421918 ``trainer.py::BoosterAlignmentTrainer``):

    grad = grad f(w) + lambda * grad h(w) - lambda * grad h(w - alpha * g_h / (||g_h|| + 1e-7))

with the same harmful batch for both ``h`` terms and the norm taken over all trainable tensors together. Three
forward/backward passes per step (the alignment batch, ``h`` at ``w``, ``h`` at the simulated harmful step).

Defaults: ``lambda`` = 5 and ``alpha`` = 0.1 as in ``smooth_align.sh``; the harmful batch is the training batch
size (8; the official loader uses 10). Training is the shipped aligned recipe (LoRA r=8 on all projections,
lr 3e-4, 155 steps, cosine) rather than the paper's 20 epochs at lr 5e-4 with LoRA r=32 on q/k/v and a constant
schedule, so that the undefended and the defended model differ only by the regulariser. Harmful pairs: 1,000
PKU Safe-RLHF / BeaverTails test pairs labelled unsafe (the paper: 5,000 BeaverTails pairs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, GradientTermHook, HookContext, TrainingHook


class BoosterConfig(HookedAlignmentConfig):
    """Booster: the shipped alignment recipe plus the harmful-perturbation attenuation regulariser."""

    lam: float = Field(5.0, ge=0.0, le=1000.0, description="Weight lambda of the attenuation regulariser.")
    alpha: float = Field(
        0.1, gt=0.0, le=10.0, description="Step size alpha of the simulated harmful step (normalised)."
    )
    harmful_batch_size: int | None = Field(
        None, ge=1, description="Harmful pairs per micro-batch (default: the training batch size)."
    )


class HarmfulStepAttenuation(GradientTermHook):
    """Booster's regulariser as a hook: two extra passes on a harmful batch, their difference added to the gradient."""

    name = "booster"

    def __init__(self, lam: float, alpha: float, batch_size: int | None = None, dataset: str = HARMFUL) -> None:
        self.lam, self.alpha, self.batch_size, self.dataset = lam, alpha, batch_size, dataset
        self.last_reduction = float("nan")  # h(w) - h(w - alpha g/|g|) of the last micro-batch

    def pop_metrics(self) -> dict[str, float]:
        """The harmful loss's drop h(w) - h(w - alpha g/|g|) of the last micro-batch."""
        return self._pop_last("last_reduction", "reduction")

    def setup(self, ctx: HookContext) -> None:
        """Cycle over the harmful pairs."""
        self.ctx = ctx
        self._harmful: Iterator[Batch] = ctx.batches(self.dataset, batch_size=self.batch_size, seed=ctx.config.seed + 1)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """``lambda * (grad h(w) - grad h(w - alpha g_h/|g_h|))`` on the next harmful batch, kept for ``after_step``."""
        from tunesec.training.steps import gradient, perturbed, trainable_parameters, unit_step

        batch = next(self._harmful)
        params = [p for _, p in trainable_parameters(model)]
        h0 = self.ctx.lm_loss(model, batch)
        g0 = gradient(h0, params)
        with perturbed(params, g0, -unit_step(g0, self.alpha)):
            h1 = self.ctx.lm_loss(model, batch)
            g1 = gradient(h1, params)
        self.last_reduction = float(h0.detach()) - float(h1.detach())
        self.keep_term(params, [self.lam * (a - b) for a, b in zip(g0, g1, strict=True)])


@register(
    "defense",
    "booster",
    description="Attenuate how much a simulated harmful step lowers the harmful loss (lambda, alpha).",
    stage="alignment",
    paper="Huang et al. 2024, Booster, arXiv 2409.01586",
    threat_model="fine-tuning-api",
    needs_harmful=True,
)
class Booster(HookedAlignment):
    """Booster (see the module docstring)."""

    name = "booster"
    config_class = BoosterConfig
    needs_harmful = True

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the attenuation regulariser on the harmful pairs."""
        assert isinstance(self.config, BoosterConfig)
        return [HarmfulStepAttenuation(self.config.lam, self.config.alpha, self.config.harmful_batch_size)]
