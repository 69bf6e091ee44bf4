"""Where named datasets come from (a local data directory or the hub) and how they are sampled.

A named dataset resolves, in order: an explicit ``path`` (file, saved ``datasets`` directory or hub id), the
file under the local data directory, then the hub by its usual id. The local data directory is ``data_dir``,
else the environment variable ``TUNESEC_DATA``, else ``../shared/data`` relative to the working directory when
it exists; its layout is the one of the shared data README (``advbench/harmful_behaviors.csv`` ...).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunesec.data.loaders import Record, read_records
from tunesec.data.schema import Example
from tunesec.errors import UsageError

DATA_ENV = "TUNESEC_DATA"
# Small permissively licensed evaluation sets shipped in the package (README.md there): the fallback when the data
# directory does not have the file, before the hub.
PACKAGED = Path(__file__).resolve().parent / "builtin" / "eval"


def data_root(data_dir: str | Path | None = None) -> Path | None:
    """The local data directory: ``data_dir``, else ``$TUNESEC_DATA``, else ``../shared/data`` if present.

    Raises:
        UsageError: ``data_dir`` or ``$TUNESEC_DATA`` names a directory that does not exist.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UsageError(f"data_dir {root}: no such directory")
        return root
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise UsageError(f"{DATA_ENV}={env}: no such directory")
        return root
    default = Path.cwd().parent / "shared" / "data"
    return default if default.is_dir() else None


@dataclass(frozen=True)
class Hub:
    """A dataset on the Hugging Face hub: id, configuration and the split that plays each local split."""

    id: str
    config: str | None = None
    splits: tuple[tuple[str, str], ...] = ()

    def split(self, split: str) -> str:
        """The hub split name for one of our split names."""
        return dict(self.splits).get(split, split)


@dataclass(frozen=True)
class Opened:
    """Raw records of a named dataset and where they came from."""

    name: str
    records: list[Record]
    origin: str  # "path", "local", "package" or "hub"


def open_source(
    dataset: str,
    *,
    data_dir: str | Path | None,
    path: str | Path | None,
    local: str | None,
    hub: Hub | None,
    split: str,
    column_names: Sequence[str] | None = None,
) -> Opened:
    """Read the raw records of a named dataset from ``path``, the local data directory, the package or the hub.

    Args:
        dataset: Registered name, for error messages.
        data_dir: Local data directory (see :func:`data_root`).
        path: Explicit file, saved ``datasets`` directory or hub id; overrides the other two.
        local: File of this dataset and split relative to the data directory; None when there is none.
        hub: Hub location; None when the dataset is not on the hub.
        split: Our split name, mapped to the hub split by ``hub.splits``.
        column_names: Header of a local csv without one.

    Raises:
        UsageError: neither a local file nor the hub has the dataset (offline, no cache, no hub id).
    """
    if path is not None:
        p = Path(path)
        cols = column_names if p.is_file() and p.suffix.lower() in (".csv", ".tsv") else None
        name, records = read_records(path, split=_hf_split(path, hub, split), column_names=cols)
        return Opened(name, records, "path")
    root = data_root(data_dir)
    looked = ""
    if local is not None and root is not None:
        file = root / local
        if file.is_file():
            name, records = read_records(file, column_names=column_names)
            return Opened(name, records, "local")
        looked = f"no local file {file}"
    if local is not None:
        packaged = PACKAGED / local
        if packaged.is_file():
            name, records = read_records(packaged, column_names=column_names)
            return Opened(name, records, "package")
    if local is None:
        looked = f"no local copy of split {split!r}"
    elif root is None:
        looked = f"no local data directory (pass data_dir= or set {DATA_ENV})"
    if hub is None:
        raise UsageError(f"dataset {dataset!r}: {looked}, and it has no hub id; pass data_dir= or path=")
    try:
        name, records = read_records(hub.id, format="hf", split=hub.split(split), config=hub.config)
    except UsageError as exc:
        raise UsageError(f"dataset {dataset!r}: {looked}; {exc}") from None
    return Opened(name, records, "hub")


def _hf_split(path: str | Path, hub: Hub | None, split: str) -> str | None:
    p = Path(path)
    if p.is_file():
        return None
    # A saved DatasetDict or a hub id takes the hub split name; a saved single Dataset ignores it.
    return hub.split(split) if hub is not None else split


def sample_examples(examples: Sequence[Example], n: int, *, seed: int = 0) -> list[Example]:
    """A deterministic sample of ``n`` examples that keeps the category balance, in the original order.

    When some examples have a category, each category gets a share of ``n`` proportional to its size
    (largest-remainder rounding, ties broken by category name), and the members of each category are drawn
    with ``random.Random(seed)``. Without categories it is a plain seeded sample. The sample keeps the input
    order, so the same ``(examples, n, seed)`` always gives the same list; ``n >= len(examples)`` gives all.

    Raises:
        UsageError: ``n`` is negative.
    """
    if n < 0:
        raise UsageError(f"limit: expected a non-negative integer, got {n}")
    if n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.category or ""].append(i)
    total = len(examples)
    names = sorted(groups)
    quotas = {c: n * len(groups[c]) // total for c in names}
    left = n - sum(quotas.values())
    by_remainder = sorted(names, key=lambda c: (-((n * len(groups[c])) % total), c))
    for c in by_remainder[:left]:
        quotas[c] += 1
    chosen: list[int] = []
    for c in names:
        chosen.extend(rng.sample(groups[c], quotas[c]))
    return [examples[i] for i in sorted(chosen)]
