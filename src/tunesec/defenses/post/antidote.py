"""``antidote``: prune the fine-tuning update's weights that matter most on harmful data.

Huang et al. 2024 (Antidote, arXiv 2408.09600; git-disl/Antidote ``utils.py::prune_wanda_outlier``): a Wanda
score ``S_ij = |W_ij| * ||X_j||_2`` (``X_j``: input column j of the layer over every token of harmful
(request, answer) chats, on the fine-tuned model), and per output row the top ``fraction`` (dense_ratio, 10%) of
the scores are pruned. The official code prunes entries of the user's LoRA A and B; tunesec scores the dense
update ``dW = W_tuned - W_aligned`` and prunes its entries (``W_ij = W_aligned_ij``), which covers a full
fine-tune and an adapter that continued the aligned one alike. Harmful data: PKU pairs labelled unsafe with the
attacks' and evaluations' prompts dropped (:func:`~tunesec.defenses.base.defense_harmful_data`); 128 pairs by
default on a CPU (paper: 2,000).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.base import HarmfulDataConfig, defense_harmful_data
from tunesec.defenses.post.base import STAGE, THREAT_MODEL, PostRepair, RepairInputs
from tunesec.models.ref import ModelRef
from tunesec.registry import register

if TYPE_CHECKING:
    import torch


class AntidoteConfig(Config):
    """How much of the update to prune and on which harmful data to score it."""

    fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="Share of each output row's update entries pruned (dense_ratio)."
    )
    harmful: HarmfulDataConfig = Field(
        default_factory=lambda: HarmfulDataConfig(n=128),
        description="Harmful (request, answer) pairs the scores are computed on (paper: 2,000; CPU default 128).",
    )
    max_seq_len: int = Field(256, ge=8, description="Tokens per harmful chat in the calibration pass.")


def prune_mask(update: torch.Tensor, norms: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the top ``fraction`` of each row's Wanda scores ``|update| * norms`` (k = int(cols * fraction))."""
    import torch

    score = update.abs() * norms.to(update.dtype)[None, :]
    k = int(update.shape[1] * fraction)
    mask = torch.zeros_like(update, dtype=torch.bool)
    if k == 0:
        return mask
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    mask.scatter_(1, top, True)
    return mask


@register(
    "defense",
    "antidote",
    description="Prune the fine-tuning update's entries with the highest Wanda score on harmful data.",
    stage=STAGE,
    paper="Huang et al. 2024, Antidote, arXiv 2408.09600",
    threat_model=THREAT_MODEL,
    needs_harmful=True,
    needs_base=False,
)
class Antidote(PostRepair):
    """Prune the fine-tuning update's entries with the highest Wanda score on harmful data."""

    name: ClassVar[str] = "antidote"
    config_class: ClassVar[type[Config]] = AntidoteConfig

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build Antidote with a config (instance, mapping of fields, or the defaults)."""
        super().__init__(config)
        self._harmful: tuple[list[Example], dict[str, Any]] | None = None

    def preflight(self, tuned: ModelRef, aligned: ModelRef, notes: list[str]) -> None:
        """Load the harmful pairs first: bad harmful data is reported before any model is loaded."""
        cfg = self.config
        assert isinstance(cfg, AntidoteConfig)
        self._harmful = defense_harmful_data(cfg.harmful, defense=self.name, notes=notes)

    def apply(self, inputs: RepairInputs, *, progress: bool = True) -> dict[str, Any]:
        """Score the update on the harmful pairs (tuned model's activations) and revert the top fraction per row."""
        import torch

        from tunesec.defenses.post.calibration import encode, input_norms

        cfg = self.config
        assert isinstance(cfg, AntidoteConfig)
        if self._harmful is None:
            self.preflight(inputs.tuned.ref, inputs.aligned.ref, inputs.notes)
        assert self._harmful is not None
        harmful, prov = self._harmful
        layers = [name for name, _, _ in inputs.updated_layers()]
        encoded = encode(harmful, inputs.tuned.tokenizer, cfg.max_seq_len, what="antidote harmful data")
        norms = input_norms(
            inputs.tuned.model, encoded, layers, progress=progress, label="antidote: harmful activations"
        )
        params, aligned = inputs.tuned.params, inputs.aligned.params
        pruned = total = 0
        with torch.no_grad():
            for name in layers:
                update = params[name] - aligned[name]
                mask = prune_mask(update, norms[name], cfg.fraction)
                params[name].copy_(torch.where(mask, aligned[name], params[name]))
                pruned += int(mask.sum())
                total += mask.numel()
        inputs.notes.append(f"antidote: pruned {pruned} of {total} update entries in {len(layers)} layers")
        return {
            "harmful_data": prov,
            "layers": len(layers),
            "pruned": pruned,
            "entries": total,
            "tokens": sum(len(e.input_ids) for e in encoded),
        }
