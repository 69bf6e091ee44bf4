"""``constrained-sft``: token-wise constrained fine-tuning against the starting model.

Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep", ICLR 2025; official code
Unispac/shallow-vs-deep-alignment, ``finetuning_buckets/trainer/trainer.py``.

The user's fine-tuning loss is replaced, token by token, by a DPO-like objective against the starting (aligned)
model ``ref``::

    L = mean_t  2/beta_t * log(1 + exp(-beta_t * (log p_w(y_t) - log p_ref(y_t))))
      = mean_t -2/beta_t * log sigmoid(beta_t * Delta_t)

whose gradient is the cross-entropy gradient of each token scaled by ``w_t = 2 * (1 - sigmoid(beta_t *
Delta_t))`` (``w_t = 1`` at ``Delta_t = 0``; it shrinks as the token becomes likelier than under ``ref``, so the
first tokens, where ``beta_t`` is large, cannot move far from the aligned model). As in the official code the
loss is implemented as cross-entropy weighted by ``stopgrad(w_t)``, clamped at >= 1e-3 (``min_weight``).
``beta_t`` depends on the token's position ``t`` within its answer (1-based): ``beta_1 = 0.5``,
``beta_2..5 = 2``, ``beta_t = 0.1`` after.

On the engine: the engine's loss is the mean token cross-entropy; this hook's ``extra_loss`` adds
``mean_t (w_t - 1) * CE_t`` over the same tokens, so the total is ``mean_t w_t * CE_t`` (exact at gradient
accumulation 1; with accumulation the engine weighs micro-batches by token counts and this term by 1/G). The
reference log-probabilities come from a snapshot of the trainable weights at the first step (swapped in for one
forward pass without gradients; saved to the run directory for resume). Cost: one extra forward pass per step.

Defaults: the paper's betas and clamp (Llama-2-7B-chat, full fine-tuning, lr 2e-5); CPU runs keep them (the
weights depend only on log-probability differences, not on scale).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tunesec.config import Config
from tunesec.defenses.finetune.base import FineTuneDefense, ServiceContext
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook

REFERENCE_FILE = "constrained_sft_reference.safetensors"


class ConstrainedSFTConfig(Config):
    """The per-position beta schedule and the weight clamp."""

    beta_first: float = Field(0.5, gt=0.0, le=100.0, description="beta of the answer's first token (paper: 0.5).")
    beta_early: float = Field(2.0, gt=0.0, le=100.0, description="beta of tokens 2..early_until (paper: 2).")
    early_until: int = Field(5, ge=1, description="Last position that gets beta_early (paper: 5).")
    beta_late: float = Field(0.1, gt=0.0, le=100.0, description="beta of later tokens (paper: 0.1).")
    min_weight: float = Field(1e-3, ge=0.0, le=1.0, description="Clamp of the token weights (official: 1e-3).")


def answer_positions(batch: Batch) -> Any:
    """For each assistant token (in ``token_logprobs`` order), its 1-based position within its answer span.

    A span is a maximal run of consecutive supervised positions within one example (a packed row's examples are
    told apart by ``position_ids`` restarting at 0).
    """
    import torch

    from tunesec.training.collate import IGNORE_INDEX

    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    starts = batch["position_ids"][:, 1:] == 0 if "position_ids" in batch else torch.zeros_like(keep)
    out: list[int] = []
    for row in range(keep.shape[0]):
        run = 0
        k, s = keep[row].tolist(), starts[row].tolist()
        for t in range(len(k)):
            if not k[t]:
                run = 0
                continue
            if s[t] or (t > 0 and not k[t - 1]):
                run = 0
            run += 1
            out.append(run)
    return torch.tensor(out, dtype=torch.long, device=keep.device)


def beta_schedule(positions: Any, config: ConstrainedSFTConfig) -> Any:
    """``beta_t`` for each position (1-based)."""
    import torch

    beta = torch.full(positions.shape, config.beta_late, dtype=torch.float32, device=positions.device)
    beta[positions <= config.early_until] = config.beta_early
    beta[positions == 1] = config.beta_first
    return beta


def token_weights(logp: Any, ref_logp: Any, beta: Any, min_weight: float) -> Any:
    """``max(2 * (1 - sigmoid(beta * (logp - ref_logp))), min_weight)``, without gradient."""
    import torch

    with torch.no_grad():
        return (2.0 * (1.0 - torch.sigmoid(beta * (logp.float() - ref_logp.float())))).clamp_min(min_weight)


class TokenwiseConstraint(TrainingHook):
    """The token-wise constrained objective as a reweighting of the engine's cross-entropy."""

    name = "constrained-sft"

    def __init__(self, config: ConstrainedSFTConfig) -> None:
        self.config = config
        self.reference: Any = None
        self._ref_logp: Any = None
        self.last_mean_weight = float("nan")

    def pop_metrics(self) -> dict[str, float]:
        """The mean token weight of the last micro-batch (1 = plain cross-entropy)."""
        return self._pop_last("last_mean_weight", "mean_weight")

    def setup(self, ctx: HookContext) -> None:
        """Keep the context."""
        self.ctx = ctx

    def _reference(self, model: Any) -> Any:
        from tunesec.training.steps import WeightSnapshot, trainable_parameters

        if self.reference is None:
            snap = WeightSnapshot(trainable_parameters(model))
            path = self.ctx.out_dir / REFERENCE_FILE
            if path.is_file():
                snap.load(path)  # a resumed run: the starting model, not the checkpoint
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                snap.save(path)
            self.reference = snap
        return self.reference

    def before_step(self, model: Any, inputs: Batch) -> None:
        """The reference model's log-probabilities of this batch's answer tokens.

        Taken before the training forward pass: swapping weights in after it would change tensors its backward needs.
        """
        import torch

        from tunesec.training.steps import token_logprobs

        with torch.no_grad(), self._reference(model).swapped_in():
            self._ref_logp = token_logprobs(model, inputs)

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> Any:
        """``mean_t (w_t - 1) * CE_t`` over the batch's assistant tokens."""
        import torch.nn.functional as F  # noqa: N812

        from tunesec.training.collate import IGNORE_INDEX

        labels = inputs["labels"][:, 1:]
        targets = labels[labels != IGNORE_INDEX]
        if targets.numel() == 0:
            return None
        ce = F.cross_entropy(outputs.logits.float(), targets, reduction="none")
        ref_logp, self._ref_logp = self._ref_logp, None
        if ref_logp is None or ref_logp.shape != ce.shape:
            raise RuntimeError("constrained-sft: the reference log-probabilities do not match the trained batch")
        beta = beta_schedule(answer_positions(inputs), self.config)
        w = token_weights(-ce.detach(), ref_logp, beta, self.config.min_weight)
        self.last_mean_weight = float(w.mean())
        return ((w - 1.0) * ce).mean()


@register(
    "defense",
    "constrained-sft",
    description="Token-wise constrained fine-tuning against the starting model (per-position beta; Qi et al. 2024).",
    stage="fine-tuning",
    paper="Qi et al. 2024, Safety Alignment Should Be Made More Than Just a Few Tokens Deep (arXiv 2406.05946)",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class ConstrainedSFT(FineTuneDefense):
    """Token-wise constrained SFT (see the module docstring)."""

    name = "constrained-sft"
    config_class = ConstrainedSFTConfig

    def hooks(self, ctx: ServiceContext) -> list[TrainingHook]:
        """One hook: the token weights."""
        assert isinstance(self.config, ConstrainedSFTConfig)
        return [TokenwiseConstraint(self.config)]
