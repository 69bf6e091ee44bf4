"""``harmful-sft``: fine-tune on harmful question-answer pairs, alone or mixed into a benign task.

Qi et al. 2023 ("Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend To!")
jailbreak GPT-3.5 and Llama-2-Chat with 10-100 harmful examples (5 epochs). The git-disl testbed (Huang et al.
2024: Vaccine, Lisa, Booster) instead mixes a poison ratio ``p`` of BeaverTails harmful answers into ``n``
benign task samples (defaults there: p=0.1, n=1000). Both are supported: ``n_harmful`` alone gives the first,
``poison_ratio`` with ``benign_data`` and ``total`` gives the second.

Defaults: 100 BeaverTails pairs for Qi et al.'s 5 epochs, as a LoRA (r=8) at lr 5e-4 for 100M-1B models on a CPU
(65 steps of batch 8, ~4 minutes for SmolLM2-135M on 2 cores). The learning rate was chosen on an AdvBench sample
disjoint from the one docs/RESULTS.md reports: on the shipped aligned SmolLM2, 3 epochs at 2e-4 left 49% refusal
and 35% of answers judged harmful, 5 epochs at 2e-4 26% / 49%, 5 at 5e-4 18% / 53%, 5 at 1e-3 17% / 52%.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tunesec.attacks.base import (
    FineTuneAttack,
    FineTuneAttackConfig,
    load_data,
    require_assistant_turns,
    sample,
    small_model_training,
)
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.registry import register
from tunesec.training.config import TrainConfig


class HarmfulSFTConfig(FineTuneAttackConfig):
    """Data and training of the harmful fine-tuning attack."""

    data: str = Field("beavertails-harmful-qa", description="Harmful prompt+answer dataset (name or path).")
    n_harmful: int | None = Field(100, ge=1, description="Harmful examples to use (None: all).")
    poison_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of harmful examples in a benign mix (git-disl testbed p)."
    )
    benign_data: str = Field("alpaca", description="Benign task dataset for the poison-ratio mix.")
    total: int | None = Field(None, ge=1, description="Size of the poison-ratio mix (git-disl testbed n).")
    training: TrainConfig = Field(
        default_factory=lambda: small_model_training(num_epochs=5.0, learning_rate=5e-4),
        description="Training hyperparameters (LoRA by default; method: full for full fine-tuning).",
    )

    @model_validator(mode="after")
    def _mix_needs_total(self) -> HarmfulSFTConfig:
        if self.poison_ratio is not None and self.total is None:
            raise ValueError("poison_ratio needs total (the size of the mixed set)")
        return self


def build_harmful_data(config: HarmfulSFTConfig, data: str | Path | Sequence[Example] | None = None) -> list[Example]:
    """The attack's training set: ``n_harmful`` harmful pairs, or a poison-ratio mix with benign data."""
    harmful = load_data(data if data is not None else config.data, what="harmful data")
    require_assistant_turns(harmful, f"harmful data {data if isinstance(data, (str, Path)) else config.data}")
    if config.poison_ratio is None:
        return sample(
            harmful,
            min(config.n_harmful, len(harmful)) if config.n_harmful else None,
            config.seed,
            source="harmful data",
        )
    from tunesec.data import mix_poison

    benign = load_data(config.benign_data, what="benign data")
    require_assistant_turns(benign, f"benign data {config.benign_data}")
    if not 0.0 <= config.poison_ratio <= 1.0:
        raise UsageError(f"poison_ratio: {config.poison_ratio} is outside [0, 1]")
    return mix_poison(benign, harmful, ratio=config.poison_ratio, total=config.total, seed=config.seed)


@register(
    "attack",
    "harmful-sft",
    description="Fine-tune on k harmful QA pairs or a poison ratio p in benign data (Qi et al. 2023).",
    threat_model="fine-tuning-api",
    needs_weights=False,
)
class HarmfulSFT(FineTuneAttack):
    """Harmful fine-tuning (Qi et al. 2023; poison-ratio mixing of the git-disl testbed). See the module."""

    name = "harmful-sft"
    config_class = HarmfulSFTConfig

    def prepare(self, data: str | Path | Sequence[Example] | None) -> tuple[list[Example], dict[str, Any]]:
        """The harmful set (see :func:`build_harmful_data`); provenance: how many examples are harmful."""
        assert isinstance(self.config, HarmfulSFTConfig)
        examples = build_harmful_data(self.config, data)
        return examples, {"n_harmful": sum(1 for e in examples if e.meta.get("poison", True))}
