"""Named datasets: look one up by its registered name, or resolve a name-or-path spec.

Importing this module registers every built-in dataset (``tunesec list datasets`` shows them with their use:
harmful-eval, benign-eval, over-refusal, harmful-train, refusal-train, benign-train, utility, judge-eval). A dataset
resolves from the local data directory first (``data_dir``, ``$TUNESEC_DATA`` or ``../shared/data``), then from
the evaluation sets shipped in the package (AdvBench, JBB-Behaviors, XSTest: ``data/builtin/eval``), then
from the hub by its usual id; see :mod:`tunesec.data.sources`.

Example:
    >>> exs = load_dataset_by_name("advbench", limit=50, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from tunesec.data import builtin, judge_sets, safety_sets, task_sets  # noqa: F401  (importing registers the datasets)
from tunesec.data.loaders import load_examples
from tunesec.data.schema import Example
from tunesec.data.sources import sample_examples
from tunesec.errors import UsageError
from tunesec.registry import registry

__all__ = ["dataset_names", "load_dataset_by_name", "resolve_dataset", "sample_examples"]


def dataset_names() -> list[str]:
    """Registered dataset names, sorted."""
    return [e.name for e in registry.entries("dataset")]


def load_dataset_by_name(
    name: str,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
    seed: int = 0,
    **options: Any,
) -> list[Example]:
    """Load a registered dataset, optionally a seeded, category-balanced sample of it.

    Args:
        name: Registered dataset name (``tunesec list datasets``), e.g. ``"advbench"``.
        data_dir: Local data directory; default ``$TUNESEC_DATA``, else ``../shared/data`` when present.
        limit: Keep ``limit`` examples chosen by :func:`~tunesec.data.sources.sample_examples`: a
            deterministic sample for ``seed`` with each category's share proportional to its size, in the
            dataset's order. None keeps all.
        split: Split name; each dataset has its default (e.g. ``test`` for utility sets).
        seed: Seed of the sample.
        **options: Dataset options, e.g. ``subset="safe"`` for xstest, ``answer=True`` for utility sets,
            ``path=`` for a file, saved ``datasets`` directory or hub id in the dataset's schema.

    Raises:
        UsageError: unknown name (the message lists the known ones), unknown option, missing data.
    """
    entry = registry.get("dataset", name)
    loader = entry.obj
    params = inspect.signature(loader).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        allowed = [p for p in params if p not in ("data_dir", "split")]
        raise UsageError(
            f"dataset {name!r} has no option {unknown[0]!r}; expected one of: {', '.join(allowed) or 'none'}"
        )
    examples: list[Example] = loader(data_dir=data_dir, split=split, **options)
    if not examples:
        raise UsageError(f"dataset {name!r}: no examples (check the split and subset options)")
    return examples if limit is None else sample_examples(examples, limit, seed=seed)


def resolve_dataset(
    spec: str | Path,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
    seed: int = 0,
    **options: Any,
) -> list[Example]:
    """A registered dataset name, else a file / dataset directory / hub id given to :func:`load_examples`.

    Args:
        spec: Dataset name (e.g. ``"jbb-harmful"``), ``NAME:SUBSET`` (e.g. ``"dolly:safety-only"``), or a path
            or hub id.
        data_dir: Local data directory for named datasets.
        limit: Sample size (seeded, category-balanced; see :func:`load_dataset_by_name`).
        split: Split name.
        seed: Seed of the sample.
        **options: Dataset options for a name; :func:`load_examples` keyword arguments for a path.

    Raises:
        UsageError: ``spec`` is neither a registered name nor a readable source.
    """
    text = str(spec)
    if ("dataset", text) in registry:
        return load_dataset_by_name(text, data_dir=data_dir, limit=limit, split=split, seed=seed, **options)
    name, _, subset = text.partition(":")
    if subset and ("dataset", name) in registry and not Path(text).expanduser().exists() and "subset" not in options:
        # NAME:SUBSET, e.g. dolly:safety-only or xstest:safe
        return load_dataset_by_name(
            name, data_dir=data_dir, limit=limit, split=split, seed=seed, subset=subset, **options
        )
    path = Path(text).expanduser()
    looks_like_path = path.exists() or path.suffix != "" or text.startswith((".", "/", "~"))
    if not looks_like_path and "/" not in text:
        raise UsageError(f"unknown dataset {text!r}: not a registered name ({', '.join(dataset_names())}) nor a file")
    params = inspect.signature(load_examples).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        raise UsageError(f"{text}: unknown loader option {unknown[0]!r}")
    examples = load_examples(path if path.exists() else text, split=split, **options)
    return examples if limit is None else sample_examples(examples, limit, seed=seed)
