"""``unlearn-smooth``: NPO unlearning of harmful answers with sharpness-aware smoothing (Fan et al. 2025).

Unlearning makes harmful answers unlikely; relearning attacks (fine-tuning on a few forgotten examples) bring
them back. Fan et al. ("Towards LLM Unlearning Resilient to Relearning Attacks: A Sharpness-Aware Minimization
Perspective and Beyond", official code OPTML-Group/Unlearn-Smooth@fc655ba, ``NPO_FT_SAM``) smooth the forget loss
with SAM so that the unlearned model sits in a flat region that a few relearning steps do not leave:

    NPO: L_f(w) = mean_i -(2 / beta) log sigmoid(-beta (log p_w(y_i|x_i) - log p_ref(y_i|x_i)))
    grad = grad L_f(w + rho g_f / |g_f|) + gamma * grad CE_retain(w)

with ``log p(y|x)`` the summed log-probability of the answer's tokens and the reference the model before
alignment (snapshot of the trainable weights at the first step, saved to the run directory so a resumed run uses
the same reference). Forget set: harmful (request, harmful answer) pairs (``judge-pku`` unsafe rows, disjoint
from the attacks' data); retain set: the shipped alignment recipe's mix (the engine's own batches), so the model
learns the recipe's refusals while it unlearns harmful answers. Three forward-backward passes per step plus one
reference forward pass.

Defaults (WMDP on Zephyr-7B: lr 5e-6 full fine-tuning, 125 steps, beta 0.015, gamma 2.25, rho 0.01) -> here:
beta, gamma and rho as there; training is the shipped recipe's LoRA run (lr 3e-4, 155 steps) so it is compared
like for like with the undefended model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, GradientTermHook, HookContext, TrainingHook

REFERENCE_FILE = "npo_reference.safetensors"


class UnlearnSmoothConfig(HookedAlignmentConfig):
    """NPO on harmful answers with SAM smoothing, trained with the shipped recipe's mix as the retain set."""

    beta: float = Field(0.015, gt=0.0, le=100.0, description="NPO inverse temperature beta.")
    gamma: float = Field(2.25, ge=0.0, le=100.0, description="Weight of the retain (alignment mix) loss.")
    rho: float = Field(0.01, ge=0.0, le=100.0, description="SAM radius on the forget loss (0: plain NPO).")
    forget_batch_size: int | None = Field(None, ge=1, description="Forget pairs per micro-batch (default: training).")


def npo_loss(logp: Any, ref_logp: Any, beta: float) -> Any:
    """NPO's loss over sequences: the mean of ``-(2/beta) log sigmoid(-beta (logp - ref_logp))``.

    At ``logp == ref_logp`` it is ``(2/beta) log 2``; it falls towards 0 as the answers become less likely than
    under the reference, and its gradient fades with it (NPO's adaptive weighting).
    """
    import torch.nn.functional as F  # noqa: N812

    return (-(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))).mean()


class NPOSmoothing(GradientTermHook):
    """The forget term (NPO at the SAM point) and the retain weight gamma, as a training hook."""

    name = "unlearn-smooth"

    def __init__(self, beta: float, gamma: float, rho: float, batch_size: int | None = None, dataset: str = HARMFUL):
        self.beta, self.gamma, self.rho, self.batch_size, self.dataset = beta, gamma, rho, batch_size, dataset
        self.reference: Any = None
        self.last_forget_loss = float("nan")

    def pop_metrics(self) -> dict[str, float]:
        """NPO's forget loss at the SAM point, of the last micro-batch."""
        return self._pop_last("last_forget_loss", "forget_loss")

    def setup(self, ctx: HookContext) -> None:
        """Cycle over the forget pairs."""
        self.ctx = ctx
        self._forget: Iterator[Batch] = ctx.batches(self.dataset, batch_size=self.batch_size, seed=ctx.config.seed + 3)

    def _reference(self, model: Any) -> Any:
        from tunesec.training.steps import WeightSnapshot, trainable_parameters

        if self.reference is None:
            snap = WeightSnapshot(trainable_parameters(model))
            path = self.ctx.out_dir / REFERENCE_FILE
            if path.is_file():
                snap.load(path)  # a resumed run: the weights before the first step, not the checkpoint's
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                snap.save(path)
            self.reference = snap
        return self.reference

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> Any:
        """``(gamma - 1) * CE`` on the retain batch, so the retain loss weighs ``gamma`` in all."""
        import torch.nn.functional as F  # noqa: N812

        from tunesec.training.collate import IGNORE_INDEX

        if self.gamma == 1.0:
            return None
        labels = inputs["labels"][:, 1:]
        targets = labels[labels != IGNORE_INDEX]
        return (self.gamma - 1.0) * F.cross_entropy(outputs.logits.float(), targets)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """NPO's gradient at the SAM point of the next forget batch, kept for ``after_step``."""
        import torch

        from tunesec.training.steps import gradient, perturbed, sequence_logprobs, trainable_parameters, unit_step

        ref = self._reference(model)
        batch = next(self._forget)
        with torch.no_grad(), ref.swapped_in():
            ref_logp = sequence_logprobs(model, batch)
        params = [p for _, p in trainable_parameters(model)]
        loss = npo_loss(sequence_logprobs(model, batch), ref_logp, self.beta)
        if self.rho > 0:
            g = gradient(loss, params)
            with perturbed(params, g, unit_step(g, self.rho)):
                loss = npo_loss(sequence_logprobs(model, batch), ref_logp, self.beta)
                term = gradient(loss, params)
        else:
            term = gradient(loss, params)
        self.last_forget_loss = float(loss.detach())
        self.keep_term(params, term)


@register(
    "defense",
    "unlearn-smooth",
    description="NPO unlearning of harmful answers at a SAM point, with the alignment mix as retain set (beta, rho).",
    stage="alignment",
    paper="Fan et al. 2025, LLM Unlearning Resilient to Relearning Attacks (SAM), arXiv 2502.05374",
    threat_model="open-weights",
    needs_harmful=True,
)
class UnlearnSmooth(HookedAlignment):
    """Unlearn-Smooth (see the module docstring)."""

    name = "unlearn-smooth"
    config_class = UnlearnSmoothConfig
    needs_harmful = True

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: NPO at the SAM point plus the retain weight."""
        assert isinstance(self.config, UnlearnSmoothConfig)
        c = self.config
        return [NPOSmoothing(c.beta, c.gamma, c.rho, c.forget_batch_size)]
