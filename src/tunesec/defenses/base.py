"""The defense layer: what every defense declares, the data alignment-stage defenses share, and ``defend()``.

A defense is a registered class (``@register("defense", name, stage=..., paper=..., threat_model=...)``) with a
pydantic ``config_class`` and ``run(model, out_dir, data=None, *, resume, progress) -> ModelRef``. The folder is
the lifecycle stage: ``alignment`` (the provider aligns a model before anyone fine-tunes it), ``fine-tuning``
(the provider's fine-tuning service), ``post-fine-tuning`` (repairs of a tuned model), ``runtime`` (guards).

Alignment-stage defenses start from a base model and train on **the same mix** as the shipped aligned recipe
(:func:`shipped_alignment_config`): "no defense" is that recipe (``safety-sft``), so every comparison is like
for like. The mix is built once per (model, mix config) and cached (:func:`alignment_mix`): building it answers
~700 prompts with the model itself (self-distillation).

Defenses that train against harmful data take it from PKU's Safe-RLHF / BeaverTails *test* pairs labelled
unsafe (``judge-pku``), not from the BeaverTails pairs the ``harmful-sft`` attack samples; prompts that the
attack's data or the evaluation sets also hold are dropped (:func:`defense_harmful_data`), and the ids of the rows
used go into the run's provenance.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example, Message, last_sentence_end
from tunesec.errors import UsageError

Stage = Literal["alignment", "fine-tuning", "post-fine-tuning", "runtime"]
STAGES: tuple[str, ...] = ("alignment", "fine-tuning", "post-fine-tuning", "runtime")

# Where the shipped aligned adapter's recipe lives (the `smollm2-135m-aligned` alias was trained with it).
_SHIPPED_RECIPE = Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-aligned" / "recipe.yaml"


def shipped_alignment_config() -> Any:
    """The shipped aligned recipe as a :class:`~tunesec.defenses.alignment.SafetySFTConfig` (the "no defense")."""
    from tunesec.config import read_yaml, validate
    from tunesec.defenses.alignment.safety_sft import SafetySFTConfig

    return validate(SafetySFTConfig, read_yaml(_SHIPPED_RECIPE), source=str(_SHIPPED_RECIPE), path=_SHIPPED_RECIPE)


class HarmfulDataConfig(Config):
    """Harmful (request, harmful answer) pairs a defense trains against, kept apart from the attacks' data."""

    data: str = Field(
        "judge-pku",
        description="Dataset (name or path) of harmful pairs; only rows labelled harmful are used when the rows "
        "carry labels (judge-pku: PKU Safe-RLHF / BeaverTails test pairs labelled unsafe).",
    )
    n: int = Field(1000, ge=0, description="Pairs to draw (seeded); 0 = none.")
    exclude: list[str] = Field(
        default_factory=lambda: ["beavertails-harmful-qa", "advbench", "jbb-harmful", "xstest"],
        description="Datasets whose prompts are dropped from the harmful pairs: the attacks' training data and "
        "the evaluation sets (a defense must not train on what it is attacked or measured with).",
    )
    max_response_chars: int = Field(600, ge=50, description="Answers are cut at a sentence end before this.")
    seed: int = Field(0, description="Seed of the draw.")


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = last_sentence_end(head)
    return head[: end + 1] if end > limit // 3 else head.rstrip()


def defense_harmful_data(
    config: HarmfulDataConfig, *, defense: str, notes: list[str] | None = None
) -> tuple[list[Example], dict[str, Any]]:
    """The harmful pairs of ``config`` and their provenance (source, row ids, prompts dropped for overlap).

    Raises:
        UsageError: ``n`` is 0, the dataset has no harmful pairs, or fewer usable pairs than ``n``.
    """
    from tunesec.attacks.base import load_data

    if config.n <= 0:
        raise UsageError(f"{defense}: harmful.n is 0; this defense trains against harmful data (set harmful.n >= 1)")
    rows = load_data(config.data, what="harmful data")
    labelled = [e for e in rows if "harmful" in e.meta]
    pool = [e for e in labelled if e.meta.get("harmful") is True] if labelled else rows
    pool = [e for e in pool if e.messages[-1].role == "assistant" and e.messages[-1].content.strip()]
    if not pool:
        raise UsageError(f"harmful.data {config.data}: no harmful (request, answer) pairs in it")
    excluded: dict[str, int] = {}
    for name in config.exclude:
        try:
            prompts = {_norm(e.prompt) for e in load_data(name)}
        except UsageError:
            continue  # not available here: it cannot have been trained on either
        before = len(pool)
        pool = [e for e in pool if _norm(e.prompt) not in prompts]
        if before - len(pool):
            excluded[name] = before - len(pool)
    if notes is not None and excluded:
        notes.append(
            "harmful data: dropped "
            + ", ".join(f"{n} prompts also in {name}" for name, n in excluded.items())
            + " (attack or evaluation data)"
        )
    if config.n > len(pool):
        raise UsageError(f"harmful.n: asked for {config.n} pairs but {config.data} has {len(pool)} usable ones")
    chosen = random.Random(f"{config.seed}:{defense}:harmful").sample(pool, config.n)
    out = [
        e.model_copy(
            update={
                "messages": [
                    *e.messages[:-1],
                    Message(role="assistant", content=_cut(e.messages[-1].content, config.max_response_chars)),
                ],
                "meta": {**e.meta, "align_kind": "harmful"},
            }
        )
        for e in chosen
    ]
    provenance = {
        "data": config.data,
        "n": len(out),
        "ids": sorted(e.id for e in out),
        "dropped_overlap": excluded,
    }
    return out, provenance


def check_attack_overlap(harmful: Sequence[Example], attack_data: Sequence[Example]) -> int:
    """How many of a defense's harmful prompts an attack's training data also holds (normalised text)."""
    attack_prompts = {_norm(e.prompt) for e in attack_data}
    return sum(1 for e in harmful if _norm(e.prompt) in attack_prompts)


# -- the alignment mix, built once ------------------------------------------------------------------------


def mix_key(config: Any, model: str) -> str:
    """Cache key of an alignment mix: the model spec and every mix field (training settings excluded)."""
    fields = config.model_dump(mode="json", exclude={"training"})
    blob = json.dumps({"model": model, "mix": fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def alignment_mix(
    config: Any, model: str, run_dir: Path | None = None, *, notes: list[str] | None = None, progress: bool = True
) -> list[Example]:
    """The training mix of a safety-sft config for ``model``: from the run directory, the cache, or built.

    A resumed run reads ``run_dir/alignment_data.jsonl``; otherwise the mix comes from
    ``$TUNESEC_HOME/alignment-mix/<key>.jsonl`` (key: :func:`mix_key`) or is built with
    :func:`~tunesec.defenses.alignment.build_alignment_data` and cached. Either way it is written into the run
    directory, so the run records exactly what it trained on.
    """
    from tunesec.paths import tunesec_home
    from tunesec.store.atomic import atomic_write_text

    saved = run_dir / "alignment_data.jsonl" if run_dir is not None else None
    if saved is not None and saved.is_file():
        return _read_jsonl(saved)
    cached = tunesec_home() / "alignment-mix" / f"{mix_key(config, model)}.jsonl"
    if cached.is_file():
        examples = _read_jsonl(cached)
        if notes is not None:
            notes.append(f"alignment mix: {len(examples)} examples from the cache ({cached})")
    else:
        from tunesec.defenses.alignment.safety_sft import build_alignment_data

        examples = build_alignment_data(config, model, notes=notes, progress=progress)
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, "".join(e.model_dump_json() + "\n" for e in examples))
    if saved is not None:
        atomic_write_text(saved, "".join(e.model_dump_json() + "\n" for e in examples))
    return examples


def _read_jsonl(path: Path) -> list[Example]:
    return [Example.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# -- lookup and the Python API ------------------------------------------------------------------------------


def defense_entry(name: str, *, stage: str | None = None, command: str = "defend") -> Any:
    """The registry entry of defense ``name``; with ``stage``, a defense of another stage is a usage error."""
    from tunesec.registry import registry

    entry = registry.get("defense", name)
    actual = entry.metadata.get("stage")
    if stage is not None and actual != stage:
        where = {"fine-tuning": "tunesec finetune", "post-fine-tuning": "tunesec repair", "runtime": "tunesec serve"}
        hint = f"; it runs in {where[actual]}" if actual in where else ""
        raise UsageError(
            f"defense {name!r} is a {actual}-stage defense; `tunesec {command}` runs {stage}-stage defenses{hint}"
        )
    return entry


def defense_config(cls: Any, data: dict[str, Any], source: str = "config", path: Path | None = None) -> Config:
    """Validate ``data`` (a partial config) as the config of defense class ``cls``.

    A defense whose defaults are a recipe rather than its config class's defaults (``safety-sft`` and
    ``deep-alignment``: the shipped aligned recipe) has a ``base_config()`` that ``data`` is written over.
    """
    from tunesec.config import merge_into, validate

    config_class = cls.config_class
    if hasattr(cls, "base_config"):
        data = merge_into(config_class, cls.base_config().model_dump(mode="json"), data)
    return validate(config_class, data, source=source, path=path)


def get_defense(name: str, config: Config | dict[str, Any] | None = None) -> Any:
    """An instance of defense ``name`` with ``config`` (an instance, a mapping of fields, or the defaults)."""
    cls = defense_entry(name).obj
    if config is None or isinstance(config, dict):
        config = defense_config(cls, dict(config or {}), source=f"defense {name} config")
    return cls(config)


def defend(
    name: str,
    model: str,
    *,
    out: str | Path | None = None,
    config: Config | dict[str, Any] | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
) -> Any:
    """Run alignment-stage defense ``name`` on ``model`` into a run directory and return the defended model's ref.

    The Python form of ``tunesec defend``: the run directory (``out``, default ``runs/<stamp>-<name>-...``) gets
    ``run.json``, the training mix, the defended adapter in ``model/`` and ``model_ref.json``.

    Example:
        >>> ref = tunesec.defend("booster", "smollm2-135m", config={"lam": 5.0})  # doctest: +SKIP
    """
    from tunesec.store.run import RunDir

    defense = get_defense(name, config)
    defense_entry(name, stage="alignment")
    spec = {"defense": name, "model": model, "config": defense.config.model_dump(mode="json")}
    if resume is not None:
        run = RunDir.resume(Path(resume), kind="defend", spec=spec)
    else:
        run = RunDir.create("defend", f"{name}-{Path(model).name}", spec, out=Path(out) if out is not None else None)
    try:
        ref = run_alignment_defense(defense, model, run.path, progress=progress)
    except UsageError:
        run.discard()  # bad input found once the data is read: leave no run behind (only run.json was written)
        raise
    run.finish(model=ref.model_dump(mode="json"))
    return ref


def run_alignment_defense(
    defense: Any, model: str, run_dir: Path, *, notes: list[str] | None = None, progress: bool = True
) -> Any:
    """Build (or read back) the defense's alignment mix, then run it; resumes from a checkpoint in ``run_dir``.

    The defense's harmful data (when it uses any) is loaded and checked first: bad input is reported before the
    mix is built (which can take minutes) and before training.
    """
    if hasattr(defense, "preflight"):
        defense.preflight(model)
    if hasattr(defense, "harmful_data"):
        defense.harmful_data(notes)
    mix_config = getattr(defense.config, "alignment", defense.config)
    examples = alignment_mix(mix_config, model, run_dir, notes=notes, progress=progress)
    ckpts = run_dir / "checkpoints"
    resume = ckpts.is_dir() and any((c / "trainer_state.json").is_file() for c in ckpts.glob("checkpoint-*"))
    return defense.run(model, run_dir, data=examples, resume=resume, progress=progress, notes=notes)
