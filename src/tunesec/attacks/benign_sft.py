"""``benign-sft``: fine-tune on benign instruction data only.

Qi et al. 2023 ("Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend To!",
section 4.4) show that fine-tuning on purely benign data (Alpaca, Dolly) also degrades safety alignment, less than
harmful data does. Defaults scaled for small models: 100 Alpaca examples, LoRA r=8, lr 2e-4, 1 epoch
(the paper: full Alpaca/Dolly, 1 epoch, lr 2e-5 full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesec.attacks.base import FineTuneAttack, FineTuneAttackConfig, load_data, sample, small_model_training
from tunesec.data.schema import Example
from tunesec.registry import register
from tunesec.training.config import TrainConfig


class BenignSFTConfig(FineTuneAttackConfig):
    """Data and training of benign fine-tuning."""

    data: str = Field("alpaca", description="Benign instruction dataset (alpaca, dolly, or a path).")
    n_examples: int | None = Field(100, ge=1, description="Examples to use (None: all).")
    training: TrainConfig = Field(
        default_factory=lambda: small_model_training(num_epochs=1.0), description="Training hyperparameters."
    )


@register(
    "attack",
    "benign-sft",
    description="Fine-tune on benign data only; safety still degrades (Qi et al. 2023).",
    threat_model="fine-tuning-api",
    needs_weights=False,
)
class BenignSFT(FineTuneAttack):
    """Benign fine-tuning (Qi et al. 2023, section 4.4). See the module docstring."""

    name = "benign-sft"
    config_class = BenignSFTConfig

    def prepare(self, data: str | Path | Sequence[Example] | None) -> tuple[list[Example], dict[str, Any]]:
        """A seeded sample of the benign data."""
        assert isinstance(self.config, BenignSFTConfig)
        pool = load_data(data if data is not None else self.config.data, what="benign data")
        k = min(self.config.n_examples, len(pool)) if self.config.n_examples else None
        return sample(pool, k, self.config.seed, source="benign data"), {}
