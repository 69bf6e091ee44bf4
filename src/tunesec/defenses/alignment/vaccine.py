"""``vaccine``: perturbation-aware alignment on hidden states (Huang et al. 2024, arXiv 2402.01109).

Harmful fine-tuning drifts the aligned model's hidden representations ("harmful embedding drift"). Vaccine
aligns the model so that its alignment loss stays low when the hidden states are perturbed adversarially:
``min_theta max_{||eps|| <= rho} f(theta, eps)``, where ``eps_l`` is added to the output of every attention
module. Each micro-batch makes two passes (official code: git-disl/Vaccine@8937f68 ``trainer.py``):

1. forward/backward on the alignment batch, recording ``e_l = dL/d(attention output of layer l)``;
   ``eps_l = rho * e_l / (||[e_1 .. e_L]|| + 1e-7)`` (one norm over all layers);
2. forward/backward on the same batch with ``eps_l`` added to each attention output; only this pass's gradient
   reaches the optimizer.

Pass 1 takes gradients with respect to the activations only (no weight gradients are formed), so a step costs
a little under two plain steps.

Defaults, scaled from Llama-2-7B on a GPU to SmolLM2-135M on a CPU: training is the shipped aligned recipe
(LoRA r=8 on all projections, lr 3e-4, 155 steps of 8, cosine) instead of the paper's 50 epochs at lr 1e-3 with
LoRA r=8/alpha=4 (a like-for-like comparison with the undefended model needs the same run); ``rho`` = 2 as in
the official README (hidden size 576 instead of 4096: the per-layer perturbation is the same norm spread over
fewer dimensions, i.e. larger per coordinate; docs/DEFENSES.md reports what it does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook


class VaccineConfig(HookedAlignmentConfig):
    """Vaccine: the shipped alignment recipe trained against hidden-state perturbations of norm ``rho``."""

    rho: float = Field(
        2.0, gt=0.0, le=100.0, description="Norm of the hidden-state perturbation (all layers together)."
    )
    modules: str = Field(
        "attention", description="Which outputs are perturbed: 'attention' (the paper), 'mlp' or 'layer'."
    )


class HiddenStatePerturbation(TrainingHook):
    """Vaccine's two passes (see the module docstring) as a training hook."""

    name = "vaccine"

    def __init__(self, rho: float, modules: str = "attention") -> None:
        self.rho = rho
        self.modules = modules
        self._adding: Any = None
        self.last_norms: list[float] = []  # per-module perturbation norms of the last step (tests read them)

    def setup(self, ctx: HookContext) -> None:
        """Keep the context; the tap is built on the first step (the PEFT-wrapped model exists then)."""
        self.ctx = ctx
        self.tap: Any = None

    def perturb(self, model: Any, inputs: Batch, names: list[str] | None = None) -> dict[str, float]:
        """Vaccine's rule on the tapped outputs (or the ``names`` among them): pass 1, then ``eps`` added.

        Returns each perturbed module's ``|eps_l|`` (together they have norm ``rho``); ``after_step`` removes it.
        """
        from tunesec.training.steps import ActivationTap, unit_step

        if self.tap is None:
            self.tap = ActivationTap(model, self.modules)
        with self.tap.recording(names):
            loss = self.ctx.lm_loss(model, inputs)
        grads = self.tap.output_gradients(loss)
        scale = unit_step(list(grads.values()), self.rho)
        eps = {name: g * scale for name, g in grads.items()}
        self._adding = self.tap.adding(eps)
        self._adding.__enter__()
        return {name: float(e.norm()) for name, e in eps.items()}

    def before_step(self, model: Any, inputs: Batch) -> None:
        """Pass 1: gradients w.r.t. the tapped outputs; then add ``eps`` to them for the training pass."""
        self.last_norms = list(self.perturb(model, inputs).values())

    def after_step(self, model: Any) -> None:
        """Remove the perturbation hooks."""
        if self._adding is not None:
            self._adding.__exit__(None, None, None)
            self._adding = None

    def teardown(self, model: Any) -> None:
        """Remove hooks left by a failed step."""
        self.after_step(model)


@register(
    "defense",
    "vaccine",
    description="Perturbation-aware alignment: train refusals under adversarial hidden-state drift (rho).",
    stage="alignment",
    paper="Huang et al. 2024, Vaccine, arXiv 2402.01109",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class Vaccine(HookedAlignment):
    """Vaccine (see the module docstring)."""

    name = "vaccine"
    config_class = VaccineConfig

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the hidden-state perturbation."""
        assert isinstance(self.config, VaccineConfig)
        return [HiddenStatePerturbation(self.config.rho, self.config.modules)]
