"""Exact and near-duplicate rows: a hash of the normalised text, and MinHash LSH (``datasketch``).

Repeated rows weigh a few examples many times in training (a poisoning lever: the same harmful pair ten
times) and inflate a data set's apparent size. Every row's text (system, user and assistant, lowercased,
whitespace collapsed) is hashed; a later copy of a row is an exact duplicate. Otherwise its word 3-gram set is
sketched with MinHash (Broder 1997) and looked up in a locality-sensitive-hashing index (``datasketch.MinHashLSH``)
for rows with an estimated Jaccard similarity of at least ``threshold``. The first occurrence is kept; each later
copy is a finding that names the row it repeats, so ``--filter`` de-duplicates.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.audit.base import Detector, DetectorConfig, Row
from tunesec.data.loaders import strip_alpaca_template
from tunesec.registry import register


class DuplicatesConfig(DetectorConfig):
    """Settings of the duplicate detector."""

    threshold: float = Field(0.9, gt=0.0, le=1.0, description="Estimated Jaccard similarity of a near duplicate.")
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations (more: slower, more precise).")
    shingle: int = Field(3, ge=1, le=10, description="Words per shingle.")


def normalise(text: str) -> str:
    """Lowercased text with whitespace collapsed."""
    return " ".join(text.lower().split())


@register("detector", "duplicates", description="Exact and near-duplicate rows (MinHash LSH, datasketch).")
class DuplicatesDetector(Detector):
    """Exact and MinHash near duplicates (see the module docstring)."""

    name = "duplicates"
    config_class = DuplicatesConfig

    def __init__(self, config: DetectorConfig | None = None) -> None:
        from datasketch import MinHash, MinHashLSH

        super().__init__(config)
        assert isinstance(self.config, DuplicatesConfig)
        self._exact: dict[bytes, int] = {}
        self._lsh = MinHashLSH(threshold=self.config.threshold, num_perm=self.config.num_perm)
        self._template = MinHash(num_perm=self.config.num_perm, seed=1)
        self._minhash: Any = MinHash

    def observe(self, rows: Sequence[Row]) -> None:
        """Flag each row that repeats an earlier one, exactly or nearly."""
        assert isinstance(self.config, DuplicatesConfig)
        k = self.config.shingle
        for row in rows:
            text = normalise(row.text)
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            first = self._exact.get(digest)
            if first is not None:
                self.flag(row, 1.0, f"exact duplicate of row {first}", of=first, jaccard=1.0)
                continue
            self._exact[digest] = row.index
            # the Alpaca template around every request would make all short rows look alike
            content = normalise("\n".join((row.system, strip_alpaca_template(row.user), row.assistant)))
            words = re.findall(r"\w+", content)
            shingles = {" ".join(words[i : i + k]).encode("utf-8") for i in range(max(1, len(words) - k + 1))}
            m = self._minhash(
                num_perm=self.config.num_perm,
                seed=1,
                permutations=self._template.permutations,
                scheme=self._template.scheme,
            )
            m.update_batch(list(shingles))
            near = self._lsh.query(m)
            if near:
                j = min(near)
                self.flag(row, self.config.threshold, f"near duplicate of row {j} (MinHash Jaccard >= "
                          f"{self.config.threshold})", of=j)  # fmt: skip
                continue
            self._lsh.insert(row.index, m, check_duplication=False)
