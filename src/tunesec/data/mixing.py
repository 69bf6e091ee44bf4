"""Mix harmful examples into benign fine-tuning data, split sets, and hash them for provenance.

:func:`mix_poison` follows the git-disl testbed (Vaccine, Lisa, Booster: Huang et al. 2024): a fine-tuning set
of ``total`` samples (their ``sample_num``) of which a fraction ``ratio`` (``poison_ratio``) is harmful, i.e.
``floor(total * ratio)`` harmful and the rest benign, each drawn without replacement.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence

from tunesec.data.schema import Example
from tunesec.errors import UsageError


def _max_total(n_benign: int, n_harmful: int, ratio: float) -> int:
    """The largest total whose ``floor(total * ratio)`` harmful and remaining benign both fit."""
    if ratio <= 0:
        return n_benign
    if ratio >= 1:
        return n_harmful
    total = int(min(n_benign / (1 - ratio), (n_harmful + 1) / ratio)) + 1
    while total > 0 and (_n_poison(total, ratio) > n_harmful or total - _n_poison(total, ratio) > n_benign):
        total -= 1
    return total


def _n_poison(total: int, ratio: float) -> int:
    # floor as in the testbed's int(p * n), with a tolerance so 0.29 * 100 gives 29, not 28.
    return math.floor(total * ratio + 1e-9)


def mix_poison(
    benign: Sequence[Example],
    harmful: Sequence[Example],
    *,
    ratio: float | None = None,
    n_harmful: int | None = None,
    total: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """A shuffled fine-tuning set of benign examples with a given share of harmful ones.

    Give exactly one of ``ratio`` or ``n_harmful``:

    * ``ratio=p`` (with ``total=n``): ``floor(n * p)`` harmful and ``n - floor(n * p)`` benign examples, as in
      the git-disl testbed's ``poison_ratio``/``sample_num``. Without ``total``, the largest ``n`` both pools
      can supply.
    * ``n_harmful=k``: ``k`` harmful examples plus ``total - k`` benign ones (all benign ones without ``total``).

    Examples are drawn without replacement with ``random.Random(seed)`` and the result is shuffled. Each
    returned example is a copy whose ``meta["poison"]`` is True for harmful and False for benign ones.

    Args:
        benign: Benign pool.
        harmful: Harmful pool.
        ratio: Fraction of harmful examples, in [0, 1].
        n_harmful: Number of harmful examples.
        total: Size of the mix.
        seed: Seed of the draw and the shuffle.

    Raises:
        UsageError: both or neither of ratio/n_harmful, a ratio outside [0, 1], negative counts, a pool too
            small for the request, or the same id in both pools.
    """
    if (ratio is None) == (n_harmful is None):
        raise UsageError("mix_poison: give exactly one of ratio= or n_harmful=")
    if total is not None and total < 0:
        raise UsageError(f"mix_poison total: expected a non-negative integer, got {total}")
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
            raise UsageError(f"mix_poison ratio: expected a value in [0, 1], got {ratio}")
        n_total = _max_total(len(benign), len(harmful), ratio) if total is None else total
        k = _n_poison(n_total, ratio)
    else:
        assert n_harmful is not None
        if n_harmful < 0:
            raise UsageError(f"mix_poison n_harmful: expected a non-negative integer, got {n_harmful}")
        k = n_harmful
        n_total = len(benign) + k if total is None else total
        if n_total < k:
            raise UsageError(f"mix_poison: total={n_total} is smaller than n_harmful={k}")
    n_benign = n_total - k
    if k > len(harmful):
        raise UsageError(f"mix_poison: {k} harmful examples requested but the harmful pool has {len(harmful)}")
    if n_benign > len(benign):
        raise UsageError(f"mix_poison: {n_benign} benign examples requested but the benign pool has {len(benign)}")
    clash = {e.id for e in benign} & {e.id for e in harmful}
    if clash:
        raise UsageError(f"mix_poison: id {sorted(clash)[0]!r} is in both pools; ids must be unique")
    rng = random.Random(seed)
    picked = [(e, False) for e in rng.sample(list(benign), n_benign)]
    picked += [(e, True) for e in rng.sample(list(harmful), k)]
    rng.shuffle(picked)
    return [e.model_copy(update={"meta": {**e.meta, "poison": poison}}) for e, poison in picked]


def train_test_split(
    examples: Sequence[Example],
    test_size: float | int,
    *,
    seed: int = 0,
    stratify: bool = False,
) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, test) with a seeded shuffle.

    Args:
        examples: The examples.
        test_size: A fraction in (0, 1) or a count of test examples.
        seed: Seed of the shuffle.
        stratify: Split each category separately so both parts keep the category shares.

    Returns:
        ``(train, test)``, each in the input order.

    Raises:
        UsageError: a fraction outside (0, 1) or a count outside [0, len(examples)].
    """
    n = len(examples)
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise UsageError(f"test_size: expected a fraction in (0, 1) or a count, got {test_size}")
    elif not 0 <= test_size <= n:
        raise UsageError(f"test_size: expected a count in [0, {n}], got {test_size}")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((ex.category or "") if stratify else "", []).append(i)
    n_test = round(n * test_size) if isinstance(test_size, float) else test_size
    test_idx: set[int] = set()
    # Largest-remainder allocation of the test count over the groups (one group when not stratified).
    names = sorted(groups)
    quotas = {g: n_test * len(groups[g]) // n for g in names} if n else {}
    by_remainder = sorted(names, key=lambda g: (-((n_test * len(groups[g])) % n), g))
    for g in by_remainder[: n_test - sum(quotas.values())]:
        quotas[g] += 1
    for g in names:
        test_idx.update(rng.sample(groups[g], quotas[g]))
    train = [e for i, e in enumerate(examples) if i not in test_idx]
    test = [e for i, e in enumerate(examples) if i in test_idx]
    return train, test


def dataset_sha256(examples: Sequence[Example]) -> str:
    """A stable hex sha256 of the examples' content, in order, for provenance.

    Each example is serialised as canonical JSON (sorted keys, no whitespace, UTF-8) of its id, messages,
    source, category, label and meta; the hash covers the count and each serialisation, so it changes when any
    example, or their order, changes, and never depends on the Python process.
    """
    h = hashlib.sha256()
    h.update(f"tunesec-examples-v1\0{len(examples)}\0".encode())
    for ex in examples:
        blob = json.dumps(ex.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        h.update(blob.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
