"""Shared machinery of the attack suite: the attack base class, data checks and how a result is saved.

Every attack is a small class registered with ``@register("attack", name, threat_model=..., needs_weights=...)``
whose pydantic config sits next to it. Fine-tuning attacks build a training set and hand it to the one training
engine (:func:`tunesec.training.train`); the result is a new :class:`~tunesec.models.ModelRef` pointing at an
adapter (or full weights) directory inside the run directory, with provenance: the attack's name and config,
the sha256 of its training data and the parent model's spec.

Heavy libraries (torch, transformers, peft) are imported inside functions only.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.training.config import TrainConfig
from tunesec.training.hooks import TrainingHook

MODEL_SUBDIR = "model"


def small_model_training(**overrides: Any) -> TrainConfig:
    """Training defaults for attacks on small models on a CPU: LoRA r=8 on every linear projection, lr 2e-4.

    Qi et al. 2023 fine-tune for 5 epochs at lr 5e-5 (full) on 7B models; for 100-400M-parameter models a LoRA
    at 2e-4 with a few dozen steps reproduces the effect within minutes on a CPU.
    """
    base: dict[str, Any] = {
        "method": "lora",
        "lora_r": 8,
        "lora_alpha": 16.0,
        "learning_rate": 2e-4,
        "per_device_batch_size": 8,
        "max_seq_len": 256,
        "save_steps": 0,
        "logging_steps": 1,
    }
    base.update(overrides)
    return TrainConfig.model_validate(base)


class FineTuneAttackConfig(Config):
    """Common fields of attacks that fine-tune a model."""

    seed: int = Field(0, description="Seed of data sampling (training has its own seed in `training.seed`).")
    training: TrainConfig = Field(default_factory=small_model_training, description="Training hyperparameters.")


class Attack(ABC):
    """An attack on a model: takes a model ref, returns a new ref to the attacked model.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`run`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Config]] = Config

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build the attack with a config (a config instance, a mapping of fields, or the defaults)."""
        from tunesec.config import as_config

        self.config = as_config(self.config_class, config, f"attack {self.name}")

    @abstractmethod
    def run(
        self,
        model: ModelRef | str,
        out_dir: str | Path,
        data: str | Path | Sequence[Example] | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
    ) -> ModelRef:
        """Attack ``model``, write the result under ``out_dir/model`` and return its ref.

        Args:
            model: The model to attack (spec string or ref).
            out_dir: Run directory (the attacked model goes to ``out_dir/model``).
            data: Training data (a dataset name, a file, or examples); default: the attack's own default.
            resume: Continue from the last training checkpoint in ``out_dir``.
            progress: Show progress bars.
        """


class FineTuneAttack(Attack):
    """An attack that is one fine-tune of the model: subclasses only build the training set.

    Subclasses implement :meth:`prepare`; :meth:`run` trains on its examples with the one engine
    (:func:`finetune_with_provenance`) and records the extra provenance it returns.
    """

    # The model being attacked and the run directory, set by :meth:`run` (or :meth:`bind`) before :meth:`prepare`,
    # for attacks that build their data with the model (filter-evasion's surrogate, backdoor's own answers) and
    # keep what they computed in the run directory so that a resumed run reads it back.
    _model: ModelRef | str | None = None
    _out: Path | None = None

    @abstractmethod
    def prepare(self, data: str | Path | Sequence[Example] | None) -> tuple[list[Example], dict[str, Any]]:
        """The training examples (from ``data`` or the config's default) and what goes into the provenance."""

    def bind(self, model: ModelRef | str) -> None:
        """Tell the attack which model its data is for, when :meth:`run` is not called (an upload to a service)."""
        self._model = model

    def hooks(self, examples: Sequence[Example]) -> list[TrainingHook]:
        """Training hooks that make the attack adaptive (default: none, a plain fine-tune)."""
        return []

    def extra_datasets(self, examples: Sequence[Example]) -> dict[str, list[Example]]:
        """Named datasets the hooks draw batches from (default: none)."""
        return {}

    def run(
        self,
        model: ModelRef | str,
        out_dir: str | Path,
        data: str | Path | Sequence[Example] | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
    ) -> ModelRef:
        """Fine-tune ``model`` on :meth:`prepare`'s examples; see :meth:`Attack.run`."""
        assert isinstance(self.config, FineTuneAttackConfig)
        self._model, self._out = model, Path(out_dir)
        examples, provenance = self.prepare(data)
        return finetune_with_provenance(
            component={"attack": self.name},
            parent=model,
            examples=examples,
            training=self.config.training,
            config_dump=self.config.model_dump(mode="json"),
            out_dir=out_dir,
            resume=resume,
            progress=progress,
            extra_provenance=provenance or None,
            hooks=self.hooks(examples),
            extra_datasets=self.extra_datasets(examples) or None,
        )


# -- data ---------------------------------------------------------------------------------------------------


def load_data(spec: str | Path | Sequence[Example], *, what: str = "data") -> list[Example]:
    """Examples from a dataset name, a file or directory, or a sequence of examples."""
    if isinstance(spec, (str, Path)):
        from tunesec.data import resolve_dataset

        examples = resolve_dataset(spec)
        source = str(spec)
    else:
        examples = list(spec)
        source = what
    if not examples:
        raise UsageError(f"{source}: empty dataset; expected at least one example")
    return examples


def require_assistant_turns(examples: Sequence[Example], source: str) -> None:
    """Raise a :class:`UsageError` naming the first example whose chat does not end with an assistant turn."""
    if not examples:
        raise UsageError(f"{source}: empty dataset; expected at least one example")
    for i, ex in enumerate(examples):
        if ex.messages[-1].role != "assistant" or not ex.messages[-1].content.strip():
            raise UsageError(
                f"{source}: example {i + 1} (id {ex.id!r}) has no final assistant turn; training data needs "
                "prompt + response chats"
            )


def sample(examples: Sequence[Example], k: int | None, seed: int, *, source: str) -> list[Example]:
    """``k`` examples drawn without replacement (all, shuffled, when ``k`` is None)."""
    import random

    pool = list(examples)
    if k is not None and k > len(pool):
        raise UsageError(f"{source}: asked for {k} examples but it has only {len(pool)}")
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool if k is None else pool[:k]


# -- model refs and results --------------------------------------------------------------------------------


def parse_ref(model: ModelRef | str) -> ModelRef:
    """The ref for a spec string (refs pass through)."""
    return ModelRef.parse(model) if isinstance(model, str) else model


def spec_string(ref: ModelRef) -> str:
    """The spec string that :meth:`ModelRef.parse` turns back into ``ref``'s base (alias, dir or hub id)."""
    if ref.kind == "openai":
        return f"openai:{ref.base}"
    if ref.revision:
        return f"{ref.base}@{ref.revision}"
    return ref.base


def root_base_spec(ref: ModelRef) -> str:
    """The spec string of the weights under every adapter.

    An alias that itself carries an adapter (``smollm2-135m-aligned``) is resolved to the spec of its base
    (recorded as ``base_spec`` in its provenance).
    """
    if ref.kind == "alias" and ref.adapter is None:
        from tunesec.registry import registry

        concrete: ModelRef = registry.get("model", ref.base).obj()
        if concrete.adapter is not None:
            base_spec = concrete.provenance.get("base_spec")
            return str(base_spec) if base_spec else spec_string(concrete)
    return spec_string(ref)


def load_for_training(ref: ModelRef, *, method: str) -> Any:
    """Load ``ref`` for training; for full fine-tuning an adapter on it is merged into the weights first."""
    if ref.is_endpoint:
        raise UsageError(f"model {ref.base!r}: an API endpoint has no weights; this attack needs open weights")
    from tunesec.models import load_model

    loaded = load_model(ref, device="auto")
    if method == "full" and hasattr(loaded.model, "merge_and_unload"):
        loaded.model = loaded.model.merge_and_unload()
    return loaded


def set_adapter_base(adapter_dir: Path, base_spec: str) -> None:
    """Record ``base_spec`` as the adapter's base so ``ModelRef.parse(adapter_dir)`` finds the base model."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_spec
    from tunesec.store.atomic import atomic_write_json

    atomic_write_json(cfg_path, cfg)


def result_ref(
    parent: ModelRef,
    output_dir: Path,
    *,
    is_adapter: bool,
    provenance: dict[str, Any],
) -> ModelRef:
    """The ref of an attacked (or aligned) model saved in ``output_dir``, with provenance.

    For an adapter, ``adapter_config.json`` gets the root base model's spec string; for full weights the
    directory itself is the new base. Provenance always holds the parent ref's spec and the weights' sha256.
    """
    from tunesec.store.provenance import sha256_file

    weights = {p.name: sha256_file(p) for p in sorted(output_dir.glob("*.safetensors"))}
    prov = {**provenance, "weights_sha256": weights, "parent": parent.spec()}
    if is_adapter:
        base_spec = root_base_spec(parent)
        set_adapter_base(output_dir, base_spec)
        base_ref = ModelRef.parse(base_spec)
        return base_ref.model_copy(update={"adapter": str(output_dir.resolve()), "provenance": prov})
    return ModelRef(base=str(output_dir.resolve()), kind="hf", provenance=prov)


def write_model_ref(out_dir: Path, ref: ModelRef) -> Path:
    """Save the ref as ``out_dir/model_ref.json`` (what later stages and reports read)."""
    from tunesec.store.atomic import atomic_write_json

    path = out_dir / "model_ref.json"
    atomic_write_json(path, ref.model_dump(mode="json"))
    return path


def finetune_with_provenance(
    *,
    component: dict[str, str],
    parent: ModelRef | str,
    examples: Sequence[Example],
    training: TrainConfig,
    config_dump: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    extra_provenance: dict[str, Any] | None = None,
    hooks: Sequence[TrainingHook] = (),
    extra_datasets: Mapping[str, Sequence[Example]] | None = None,
) -> ModelRef:
    """Fine-tune ``parent`` on ``examples`` with the one training engine and return the new ref.

    All input checks (assistant turns, LoRA target modules) happen before the first training step. The
    result is saved under ``out_dir/model``; ``out_dir/model_ref.json`` records the returned ref.

    Args:
        component: ``{"attack": name}`` or ``{"defense": name}`` for the provenance.
        parent: The model to fine-tune.
        examples: Training chats, each ending with an assistant turn.
        training: Training hyperparameters.
        config_dump: The component's full config (JSON-able) for the provenance.
        out_dir: Run directory.
        resume: Continue from the last checkpoint.
        progress: Show a progress bar.
        extra_provenance: More provenance fields.
        hooks: Training hooks (a defense's extra loss terms); their names go into the provenance.
        extra_datasets: Named datasets the hooks draw batches from (``HookContext.batches``).
    """
    from tunesec.data import dataset_sha256
    from tunesec.training import train

    ref = parse_ref(parent)
    what = " ".join(f"{k} {v}" for k, v in component.items())
    require_assistant_turns(examples, f"{what} data")
    out = Path(out_dir)
    loaded = load_for_training(ref, method=training.method)
    result = train(
        loaded,
        list(examples),
        training,
        out_dir=out,
        hooks=hooks,
        extra_datasets=extra_datasets,
        resume=resume,
        progress=progress,
    )
    prov: dict[str, Any] = {
        **component,
        **({"hooks": [h.name for h in hooks]} if hooks else {}),
        "config": config_dump,
        "data_sha256": dataset_sha256(list(examples)),
        "n_examples": len(examples),
        "train": {
            "steps": result.metrics.steps,
            "seconds": round(result.metrics.seconds, 2),
            "first_loss": result.metrics.losses[0] if result.metrics.losses else None,
            "last_loss": result.metrics.losses[-1] if result.metrics.losses else None,
        },
        **(extra_provenance or {}),
    }
    new = result_ref(ref, result.output_dir, is_adapter=result.adapter_dir is not None, provenance=prov)
    write_model_ref(out, new)
    return new
