"""What the hook-based alignment defenses share: the shipped recipe's mix and training, harmful data, provenance.

Each defense (Vaccine, T-Vaccine, Booster, VAA, CTRAP) is the shipped aligned recipe (``safety-sft`` with
``recipes/align-smollm2.yaml``) plus training hooks: same refusal and helpful examples, same LoRA, learning
rate and steps, so the undefended model differs from the defended one only by the defense's terms. A subclass
sets ``name``, ``config_class`` and ``needs_harmful`` and builds its hooks in :meth:`HookedAlignment.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.alignment.safety_sft import SafetySFTConfig
from tunesec.defenses.base import HarmfulDataConfig, defense_harmful_data, shipped_alignment_config
from tunesec.models.ref import ModelRef
from tunesec.training.hooks import TrainingHook

HARMFUL = "harmful"  # name of the harmful pairs among the engine's extra datasets


class HookedAlignmentConfig(Config):
    """Fields every hook-based alignment defense has: the alignment recipe and the harmful pairs."""

    alignment: SafetySFTConfig = Field(
        default_factory=shipped_alignment_config,
        description="The alignment recipe (safety-sft fields: the mix and `training`); default: the shipped "
        "aligned recipe, so the undefended baseline is that recipe. A partial mapping overrides only its keys.",
    )
    harmful: HarmfulDataConfig = Field(
        default_factory=HarmfulDataConfig, description="Harmful pairs the defense trains against (when it does)."
    )


class HookedAlignment:
    """An alignment-stage defense: the shipped recipe's training run plus this defense's hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[HookedAlignmentConfig]] = HookedAlignmentConfig
    needs_harmful: ClassVar[bool] = False
    trains_on_harmful: ClassVar[bool] = True  # False: the harmful pairs serve preparation only (VAA's proxy)

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build the defense with a config (instance, mapping of fields, or the defaults)."""
        from tunesec.config import as_config

        self.config = as_config(self.config_class, config, f"defense {self.name}")
        self._harmful: tuple[list[Example], dict[str, Any]] | None = None

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """The training hooks that make this defense (``harmful``: the harmful pairs, ``data``: the mix)."""
        return []

    def preflight(self, model: ModelRef | str) -> None:
        """Checks of the defense's own settings against ``model``, before any data is built (default: none)."""

    def prepare(
        self,
        model: ModelRef | str,
        out_dir: Path,
        data: Sequence[Example],
        harmful: Sequence[Example],
        *,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Work before training (VAA's vulnerable groups); returns more provenance. Default: nothing."""
        return {}

    def training_mix(
        self, mix: Sequence[Example], notes: list[str] | None = None
    ) -> tuple[list[Example], dict[str, Any]]:
        """The examples trained on, made from the recipe's mix, and their provenance.

        Default: the mix as it is; SDD replaces its refusal answers.
        """
        return list(mix), {}

    def extra_datasets(self, harmful: Sequence[Example], data: Sequence[Example]) -> dict[str, list[Example]]:
        """The engine's extra datasets (default: the harmful pairs as ``harmful``; ``data`` is the mix)."""
        return {HARMFUL: list(harmful)} if harmful and self.trains_on_harmful else {}

    def harmful_data(self, notes: list[str] | None = None) -> tuple[list[Example], dict[str, Any]]:
        """The harmful pairs (empty when the defense does not use them) and their provenance; loaded once.

        ``tunesec defend`` calls this before building the alignment mix, so bad harmful data is reported first.
        """
        if not self.needs_harmful:
            return [], {}
        if self._harmful is None:
            self._harmful = defense_harmful_data(self.config.harmful, defense=self.name, notes=notes)
        return self._harmful

    def run(
        self,
        model: ModelRef | str,
        out_dir: str | Path,
        data: Sequence[Example] | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        notes: list[str] | None = None,
    ) -> ModelRef:
        """Align ``model`` on ``data`` (default: the recipe's mix) with this defense's hooks; see ``tunesec defend``."""
        from tunesec.attacks.base import finetune_with_provenance, spec_string
        from tunesec.defenses.base import alignment_mix

        out = Path(out_dir)
        recipe = self.config.alignment
        spec = model if isinstance(model, str) else spec_string(model)
        mix = list(data) if data is not None else alignment_mix(recipe, spec, out, notes=notes, progress=progress)
        examples, mix_prov = self.training_mix(mix, notes)
        harmful, harmful_prov = self.harmful_data(notes)
        extra_prov = self.prepare(model, out, examples, harmful, progress=progress)
        hooks = self.hooks(harmful, examples)
        return finetune_with_provenance(
            component={"defense": self.name},
            parent=model,
            examples=examples,
            training=recipe.training,
            config_dump=self.config.model_dump(mode="json"),
            out_dir=out,
            resume=resume,
            progress=progress,
            extra_provenance={**({"harmful_data": harmful_prov} if harmful_prov else {}), **mix_prov, **extra_prov},
            hooks=hooks,
            extra_datasets=self.extra_datasets(harmful, examples),
        )
