"""``seam``: self-destructive alignment (Wang et al. 2025, SEAM, arXiv 2505.12186).

SEAM couples the harmful and the benign task so that harmful fine-tuning wrecks the model: it aligns with a term
that makes the gradient of the harmful loss point against the gradient of the benign loss, so that every step an
attacker takes down the harmful loss is a step up the benign one. Official objective (ZJUWYH/seam@65f3d5c,
``src/core/trainer.py::SeamTrainer``):

    L = L_ul + alpha * L_up + beta * L_sd
    L_ul = -log(1 + mean over layers of the logit-lens CE of harmful answers)     (unlearning)
    L_up = CE(refusal | harmful request)                                          (alignment)
    L_sd = cos(g_a, g_b),  g_a = grad CE(harmful),  g_b = grad CE(benign)         (self-destruction)

``grad L_sd`` needs Hessian-vector products; SEAM estimates them by finite differences:

    grad L_sd ~ (g_a(w + eps (gb^ - c ga^)) - g_a(w)) / (eps |g_a|)
              + (g_b(w + eps (ga^ - c gb^)) - g_b(w)) / (eps |g_b|)

with ``c = cos(g_a, g_b)`` and ``^`` unit vectors (:func:`sd_gradient`; tested against autograd's exact gradient).
Six forward-backward passes per step: the training batch, the unlearning term, ``g_a``, ``g_b`` and the two
shifted gradients.

As built here: ``L_up`` is the shipped aligned recipe's own training (its refusals and helpful answers, alpha = 1);
harmful pairs come from ``judge-pku`` unsafe rows (disjoint from the attacks' data); the benign batches are the
recipe's helpful examples. Defaults alpha 1, beta 0.01, eps 1e-3 (official); the logit lens is scored on
``lens_tokens`` answer tokens per step (see ``repnoise``). The paper fully fine-tunes Llama-2-7B at lr 2e-5 for one
epoch over 8k examples; here the recipe's LoRA run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, GradientTermHook, HookContext, TrainingHook

BENIGN = "benign"
NORM_EPS = 1e-12


class SEAMConfig(HookedAlignmentConfig):
    """SEAM: unlearning, the recipe's alignment, and the gradient-coupling term."""

    beta: float = Field(0.01, ge=0.0, le=100.0, description="Weight of the self-destruction term cos(g_a, g_b).")
    unlearn_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the unlearning term L_ul.")
    eps: float = Field(1e-3, gt=0.0, le=1.0, description="Finite-difference step of the Hessian-free estimate.")
    lens_tokens: int = Field(64, ge=1, description="Answer tokens per step scored through every layer's logit lens.")
    harmful_batch_size: int | None = Field(None, ge=1, description="Harmful pairs per micro-batch (default: training).")


def sd_gradient(
    grad_fn: Any, params: Sequence[Any], batch_a: Batch, batch_b: Batch, eps: float
) -> tuple[list[Any], float]:
    """SEAM's Hessian-free estimate of ``grad cos(g_a, g_b)`` and the cosine itself.

    ``grad_fn(batch)`` returns the loss gradient on ``batch`` at the current weights (a list over ``params``).
    The weights are shifted for two of the four gradients and restored exactly.
    """
    import torch

    from tunesec.training.steps import global_norm, perturbed

    g_a, g_b = grad_fn(batch_a), grad_fn(batch_b)
    na, nb = float(global_norm(g_a)) + NORM_EPS, float(global_norm(g_b)) + NORM_EPS
    ua, ub = [g / na for g in g_a], [g / nb for g in g_b]
    c = float(sum((x.double() * y.double()).sum() for x, y in zip(ua, ub, strict=True)))
    with torch.no_grad():
        va = [y - c * x for x, y in zip(ua, ub, strict=True)]
        vb = [x - c * y for x, y in zip(ua, ub, strict=True)]
    with perturbed(params, va, eps):
        g_a2 = grad_fn(batch_a)
    with perturbed(params, vb, eps):
        g_b2 = grad_fn(batch_b)
    est = [(a2 - a) / (eps * na) + (b2 - b) / (eps * nb) for a, a2, b, b2 in zip(g_a, g_a2, g_b, g_b2, strict=True)]
    return est, c


class SelfDestruction(GradientTermHook):
    """SEAM's unlearning and self-destruction terms as a hook (L_up is the engine's own batch)."""

    name = "seam"

    def __init__(
        self, beta: float, unlearn_weight: float, eps: float, lens_tokens: int = 64, batch_size: int | None = None
    ) -> None:
        self.beta, self.unlearn_weight, self.eps = beta, unlearn_weight, eps
        self.lens_tokens, self.batch_size = lens_tokens, batch_size
        self.last: dict[str, float] = {}

    def pop_metrics(self) -> dict[str, float]:
        """Measured since the last call: the unlearning loss, the cosine of the harmful and benign gradients."""
        out, self.last = self.last, {}
        return out

    def setup(self, ctx: HookContext) -> None:
        """Cycle over the harmful pairs and the benign examples."""
        self.ctx = ctx
        self._harmful: Iterator[Batch] = ctx.batches(HARMFUL, batch_size=self.batch_size, seed=ctx.config.seed + 5)
        self._benign: Iterator[Batch] = ctx.batches(BENIGN, batch_size=self.batch_size, seed=ctx.config.seed + 6)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """Backpropagate L_ul; estimate beta * grad L_sd for ``after_step``."""
        import torch

        from tunesec.training.steps import gradient, logit_lens_losses, step_rng, trainable_parameters

        harmful, benign = next(self._harmful), next(self._benign)
        accumulation = max(self.ctx.clock.accumulation, 1)
        if self.unlearn_weight > 0:
            kwargs = {k: harmful[k] for k in ("attention_mask", "position_ids") if k in harmful}
            out = model(input_ids=harmful["input_ids"], output_hidden_states=True, use_cache=False, **kwargs)
            rng = step_rng(self.ctx.config.seed, self.ctx.clock, "seam-lens")
            lens = logit_lens_losses(model, harmful, out.hidden_states, self.lens_tokens, rng)
            unlearn = -torch.log(1.0 + lens.mean())
            (self.unlearn_weight * unlearn / accumulation).backward()
            self.last["unlearn"] = float(unlearn.detach())
        params = [p for _, p in trainable_parameters(model)]
        est, cos = sd_gradient(
            lambda b: gradient(self.ctx.lm_loss(model, b), params), params, harmful, benign, self.eps
        )
        self.last["cos"] = cos
        self.keep_term(params, [self.beta * g for g in est])


@register(
    "defense",
    "seam",
    description="Self-destructive alignment: harmful and benign gradients made to conflict (+ unlearning).",
    stage="alignment",
    paper="Wang et al. 2025, Self-Destructive Language Model (Seam), arXiv 2505.12186",
    threat_model="open-weights",
    needs_harmful=True,
)
class SEAM(HookedAlignment):
    """SEAM (see the module docstring)."""

    name = "seam"
    config_class = SEAMConfig
    needs_harmful = True

    def extra_datasets(self, harmful: Sequence[Example], data: Sequence[Example]) -> dict[str, list[Example]]:
        """The harmful pairs and the benign batches (the recipe's helpful examples)."""
        benign = [e for e in data if e.meta.get("align_kind") not in ("refusal", "deep-refusal")]
        return {HARMFUL: list(harmful), BENIGN: benign}

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the unlearning and self-destruction terms."""
        assert isinstance(self.config, SEAMConfig)
        c = self.config
        return [SelfDestruction(c.beta, c.unlearn_weight, c.eps, c.lens_tokens, c.harmful_batch_size)]
