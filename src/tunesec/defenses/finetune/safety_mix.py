"""``safety-mix``: mix the provider's safety examples into the user's fine-tuning (SafeInstr).

Bianchi et al. 2024 ("Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that
Follow Instructions", ICLR 2024; code vinid/safety-tuned-llamas) add a few hundred safety examples (refusals of
harmful instructions) to 20k Alpaca instructions and find that 3% restores most of the safety. Two forms:

- ``mode: mix`` (default): ``k`` safety examples are added to the user's rows (the service trains on both);
- ``mode: batch``: each micro-batch also trains on a batch of safety examples with weight ``weight``
  (``L(user) + weight * L(safety)``, the fine-tuning-stage variant in the git-disl Booster repository's
  ``VlguardTrainer``); one extra forward-backward per step.

Defaults: the paper's sweet spot is ~500 safety examples in 20k (2.5%; it sweeps 100-2,000). Here ``k`` defaults
to 3% of the user's rows (30 for the 1,000-row git-disl setting), at least 1; ``weight`` 1.0 (the Booster repo's
lambda). Safety examples: the shipped aligned recipe's refusal data (tunesec.defenses.finetune.base).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.finetune.base import FineTuneDefense, ServiceContext
from tunesec.registry import register
from tunesec.training.hooks import ExtraBatch, HookContext, TrainingHook

SAFETY = "safety-mix"


class SafetyMixConfig(Config):
    """How many safety examples, and how they are mixed in."""

    mode: Literal["mix", "batch"] = Field("mix", description="'mix': k rows added; 'batch': a weighted batch a step.")
    k: int | None = Field(None, ge=1, description="Safety rows added in 'mix' mode (default: 3% of the user rows).")
    share: float = Field(0.03, gt=0.0, le=1.0, description="k as a share of the user rows when k is not set.")
    weight: float = Field(1.0, gt=0.0, le=100.0, description="Loss weight of the safety batch in 'batch' mode.")
    batch_size: int | None = Field(None, ge=1, description="Safety rows per batch in 'batch' mode (default: training).")


class SafetyBatches(TrainingHook):
    """A weighted safety batch with every micro-batch."""

    name = "safety-mix"

    def __init__(self, weight: float, batch_size: int | None = None, dataset: str = SAFETY) -> None:
        self.weight, self.batch_size, self.dataset = weight, batch_size, dataset

    def setup(self, ctx: HookContext) -> None:
        """Keep the context."""
        self.ctx = ctx

    def extra_batches(self) -> Iterator[ExtraBatch]:
        """Safety batches, cycling, with the configured weight."""
        for batch in self.ctx.batches(self.dataset, batch_size=self.batch_size, seed=self.ctx.config.seed + 11):
            yield ExtraBatch(batch, weight=self.weight)


@register(
    "defense",
    "safety-mix",
    description="Mix k safety examples into the user's data, or a weighted safety batch per step (SafeInstr).",
    stage="fine-tuning",
    paper="Bianchi et al. 2024, Safety-Tuned LLaMAs, ICLR 2024 (arXiv 2309.07875)",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class SafetyMix(FineTuneDefense):
    """SafeInstr-style safety-data mixing (see the module docstring)."""

    name = "safety-mix"
    config_class = SafetyMixConfig

    def k_for(self, n_user: int) -> int:
        """The number of safety rows for ``n_user`` user rows."""
        assert isinstance(self.config, SafetyMixConfig)
        return self.config.k if self.config.k is not None else max(1, round(self.config.share * n_user))

    def add_data(self, examples: Sequence[Example], ctx: ServiceContext) -> tuple[list[Example], dict[str, Any]]:
        """In 'mix' mode, the user rows plus k safety rows."""
        assert isinstance(self.config, SafetyMixConfig)
        if self.config.mode != "mix":
            return list(examples), {}
        # k is a share of the *user's* rows: rows another defense added before this one (BackdoorAlign's) do not count
        n_user = sum(1 for e in examples if not e.meta.get("service_safety"))
        k = self.k_for(n_user)
        added = [
            e.model_copy(update={"meta": {**e.meta, "service_safety": True}}) for e in ctx.safety_sample(k, SAFETY)
        ]
        ctx.notes.append(f"safety-mix: added {k} safety examples to {n_user} user rows")
        return [*examples, *added], {"added": k, "ids": sorted(e.id for e in added)}

    def extra_datasets(self, ctx: ServiceContext) -> dict[str, list[Example]]:
        """In 'batch' mode, the safety examples."""
        assert isinstance(self.config, SafetyMixConfig)
        return {SAFETY: ctx.safety_examples()} if self.config.mode == "batch" else {}

    def hooks(self, ctx: ServiceContext) -> list[TrainingHook]:
        """In 'batch' mode, the weighted safety batches."""
        assert isinstance(self.config, SafetyMixConfig)
        if self.config.mode != "batch":
            return []
        return [SafetyBatches(self.config.weight, self.config.batch_size)]
