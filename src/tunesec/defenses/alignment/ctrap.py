"""``ctrap``: a collapse trap that springs under harmful fine-tuning (Yi et al. 2025, CTRAP, arXiv 2505.16559).

Instead of resisting harmful updates, CTRAP plants a trap: after a (simulated) harmful fine-tuning step the model
should *collapse*, answering everything with one fixed token, so an attacker who fine-tunes it on harmful data
destroys its usefulness. Alignment adds a term on the retain batch at the simulated harmful step (official code:
clearloveclearlove/CTRAP@bb0f07e ``trainer.py::CTRAPTrainer``):

    grad = grad f(w; retain) + lambda * grad CE_collapse(w - alpha * g_h / (||g_h|| + 1e-7); retain)

where ``g_h`` is the gradient of the harmful loss on a harmful batch and ``CE_collapse`` is the cross-entropy of
the retain batch with every supervised label replaced by the collapse token: the last token of
``tokenizer("an error")`` (" error" with its leading space), as in the official code. The retain batch is the
training batch (the shipped mix holds refusals and helpful answers together, as the official retain batch =
alignment + helpful). Three forward/backward passes per step.

Defaults: ``alpha`` = 0.1 and ``lambda`` = 0.1 (``CTRAP.sh``); training is the shipped aligned recipe instead of
the paper's 20 epochs at lr 5e-4 with LoRA r=32 on q/k/v (like-for-like with the undefended model); harmful pairs:
1,000 PKU Safe-RLHF / BeaverTails test pairs labelled unsafe (the paper: 5,000 BeaverTails pairs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, GradientTermHook, HookContext, TrainingHook


class CTRAPConfig(HookedAlignmentConfig):
    """CTRAP: the shipped alignment recipe plus the collapse-trap term."""

    lam: float = Field(0.1, ge=0.0, le=1000.0, description="Weight lambda of the collapse term.")
    alpha: float = Field(
        0.1, gt=0.0, le=10.0, description="Step size alpha of the simulated harmful step (normalised)."
    )
    collapse_text: str = Field(
        "an error",
        min_length=1,
        description="The collapse token is the last token of this text (official: 'an error').",
    )
    harmful_batch_size: int | None = Field(
        None, ge=1, description="Harmful pairs per micro-batch (default: the training batch size)."
    )


def collapse_token(tokenizer: Any, text: str = "an error") -> int:
    """The collapse token: the last id of ``tokenizer(text)`` (official: " error" out of "an error")."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"collapse_text {text!r} has no tokens")
    return int(ids[-1])


def collapse_labels(labels: Any, token: int) -> Any:
    """``labels`` with every supervised position (not -100) replaced by ``token``."""
    import torch

    from tunesec.training.collate import IGNORE_INDEX

    return torch.where(labels != IGNORE_INDEX, torch.full_like(labels, token), labels)


class CollapseTrap(GradientTermHook):
    """CTRAP's term as a hook: gradient of the collapse loss at a simulated harmful step, added to the step's."""

    name = "ctrap"

    def __init__(
        self, lam: float, alpha: float, text: str = "an error", batch_size: int | None = None, dataset: str = HARMFUL
    ) -> None:
        self.lam, self.alpha, self.text, self.batch_size, self.dataset = lam, alpha, text, batch_size, dataset
        self.last_collapse_loss = float("nan")

    def pop_metrics(self) -> dict[str, float]:
        """The collapse loss at the simulated harmful step, of the last micro-batch."""
        return self._pop_last("last_collapse_loss", "collapse_loss")

    def setup(self, ctx: HookContext) -> None:
        """Find the collapse token; cycle over the harmful pairs."""
        self.ctx = ctx
        self.token = collapse_token(ctx.tokenizer, self.text)
        self._harmful: Iterator[Batch] = ctx.batches(self.dataset, batch_size=self.batch_size, seed=ctx.config.seed + 1)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """``lambda * grad CE_collapse`` on this retain batch at ``w - alpha g_h/|g_h|``, kept for ``after_step``."""
        from tunesec.training.steps import gradient, perturbed, trainable_parameters, unit_step

        params = [p for _, p in trainable_parameters(model)]
        g_h = gradient(self.ctx.lm_loss(model, next(self._harmful)), params)
        collapse = {**inputs, "labels": collapse_labels(inputs["labels"], self.token)}
        with perturbed(params, g_h, -unit_step(g_h, self.alpha)):
            loss = self.ctx.lm_loss(model, collapse)
            g_c = gradient(loss, params)
        self.last_collapse_loss = float(loss.detach())
        self.keep_term(params, [self.lam * g for g in g_c])


@register(
    "defense",
    "ctrap",
    description="Collapse trap: after a simulated harmful step the model should emit one fixed token (lambda, alpha).",
    stage="alignment",
    paper="Yi et al. 2025, CTRAP, arXiv 2505.16559",
    threat_model="fine-tuning-api",
    needs_harmful=True,
)
class CTRAP(HookedAlignment):
    """CTRAP (see the module docstring)."""

    name = "ctrap"
    config_class = CTRAPConfig
    needs_harmful = True

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the collapse trap."""
        assert isinstance(self.config, CTRAPConfig)
        c = self.config
        return [CollapseTrap(c.lam, c.alpha, c.collapse_text, c.harmful_batch_size)]
