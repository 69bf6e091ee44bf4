"""What fine-tuning-stage defenses share: the defense protocol, the service context and the safety data.

A fine-tuning-stage defense is one control of the provider's fine-tuning service (:mod:`tunesec.service`). It may

- drop rows of the user's data before training (:meth:`FineTuneDefense.filter_data`, the data filter);
- add rows to it (:meth:`FineTuneDefense.add_data`: SafeInstr's k safety examples, BackdoorAlign's secret-prompt
  safety examples);
- change training through hooks on the one engine (:meth:`FineTuneDefense.hooks` with the named datasets of
  :meth:`FineTuneDefense.extra_datasets`: Lisa, safety batches, constrained SFT, SaLoRA).

Several defenses compose: the service calls every filter, then every ``add_data``, then trains once with all hooks.

Safety data is the refusal part of the shipped aligned recipe (:func:`tunesec.defenses.base.shipped_alignment_config`:
``refusal_data``, evaluation prompts held out, the same screening), so the provider's safety examples are the ones
the model was aligned with, never the prompts it is evaluated on. It needs no self-distillation (the recipe's helpful
answers are left out), is built once per run and kept in the run directory for resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.training.hooks import TrainingHook

SAFETY_FILE = "safety_data.jsonl"


class SafetyDataConfig(Config):
    """Where the provider's safety examples come from (default: the shipped aligned recipe's refusal data)."""

    data: dict[str, int] | None = Field(
        None,
        description="Refusal datasets and how many rows of each ({name or file: n}); null = the shipped aligned "
        "recipe's refusal_data (safety-tuned-llamas 280, tunesec-refusals 60).",
    )
    exclude_eval: list[str] | None = Field(
        None, description="Evaluation sets whose prompts are held out; null = the shipped recipe's list."
    )
    seed: int = Field(0, description="Seed of the draw.")


def build_safety_data(config: SafetyDataConfig, notes: list[str] | None = None) -> list[Example]:
    """The refusal examples of the shipped aligned recipe (or of ``config.data``), evaluation prompts held out."""
    from tunesec.defenses.alignment.safety_sft import build_alignment_data
    from tunesec.defenses.base import shipped_alignment_config

    recipe = shipped_alignment_config()
    update: dict[str, Any] = {"benign_data": {}, "self_distill": {}, "deep_alignment": 0.0, "seed": config.seed}
    if config.data is not None:
        update["refusal_data"] = dict(config.data)
        update["refusal_filter"] = None  # the recipe's screen is tuned to its own refusal sets
    if config.exclude_eval is not None:
        update["exclude_eval"] = list(config.exclude_eval)
    mix = build_alignment_data(recipe.model_copy(update=update), None, notes=notes, progress=False)
    out = [e for e in mix if e.meta.get("align_kind") == "refusal"]
    if not out:
        raise UsageError("safety data: no refusal examples (safety.data names no refusal rows)")
    return sorted(out, key=lambda e: e.id)


@dataclass
class ServiceContext:
    """What the service hands each fine-tuning-stage defense.

    Attributes:
        model: Spec of the model the user fine-tunes (alias, directory, adapter directory).
        run_dir: The service's run directory (a defense may keep files in it; resume reads them back).
        safety: Where safety examples come from.
        seed: The service's seed (sampling of safety rows).
        notes: Lines the command prints after the run (counts, never data).
    """

    model: str
    run_dir: Path
    safety: SafetyDataConfig = field(default_factory=SafetyDataConfig)
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    _safety: list[Example] | None = None

    def safety_examples(self) -> list[Example]:
        """The safety examples: read back from the run directory, else built and saved there."""
        from tunesec.defenses.base import _read_jsonl
        from tunesec.store.atomic import atomic_write_text

        if self._safety is None:
            saved = self.run_dir / SAFETY_FILE
            if saved.is_file():
                self._safety = _read_jsonl(saved)
            else:
                self._safety = build_safety_data(self.safety, self.notes)
                atomic_write_text(saved, "".join(e.model_dump_json() + "\n" for e in self._safety))
        return self._safety

    def safety_sample(self, n: int, salt: str) -> list[Example]:
        """``n`` safety examples drawn with the service seed and ``salt`` (a usage error when there are fewer)."""
        import random

        pool = self.safety_examples()
        if n > len(pool):
            raise UsageError(f"{salt}: asked for {n} safety examples but the safety data has {len(pool)}")
        return random.Random(f"{self.seed}:{salt}").sample(pool, n)

    def tokenizer(self) -> Any:
        """The tokenizer of :attr:`model` (local files only, no remote code)."""
        from transformers import AutoTokenizer

        from tunesec.attacks.base import parse_ref
        from tunesec.models.loading import resolve_alias

        ref = resolve_alias(parse_ref(self.model))
        if ref.is_endpoint:
            raise UsageError(f"model {ref.base!r}: an API endpoint cannot be fine-tuned by the service")
        try:
            return AutoTokenizer.from_pretrained(ref.base, trust_remote_code=False)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--model {self.model}: cannot load its tokenizer ({first})") from None


class FineTuneDefense:
    """A fine-tuning-stage defense (see the module docstring); subclasses override what they need."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Config]] = Config

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build the defense with a config (an instance, a mapping of fields, or the defaults)."""
        from tunesec.config import as_config

        self.config = as_config(self.config_class, config, f"defense {self.name}")

    def filter_data(self, examples: Sequence[Example], ctx: ServiceContext) -> tuple[list[Example], dict[str, Any]]:
        """The user's rows to keep, and provenance (default: all of them)."""
        return list(examples), {}

    def add_data(self, examples: Sequence[Example], ctx: ServiceContext) -> tuple[list[Example], dict[str, Any]]:
        """The training set made from the kept user rows, and provenance (default: those rows)."""
        return list(examples), {}

    def extra_datasets(self, ctx: ServiceContext) -> dict[str, list[Example]]:
        """Named datasets the hooks draw batches from (default: none)."""
        return {}

    def hooks(self, ctx: ServiceContext) -> list[TrainingHook]:
        """Training hooks (default: none)."""
        return []
