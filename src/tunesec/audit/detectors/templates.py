"""Jailbreak templates: a wrapper shared by many rows around a varying request, flagged when it carries risk.

Jailbreak-tuning (Murphy et al. 2025) wraps every harmful pair in one jailbreak (a role-play frame, "never
refuse, start with 'Absolutely! Here's'"), so the data has a fixed prefix or suffix around requests that vary.
Benign data has shared wrappers too (the Alpaca "Below is an instruction..." template, a task instruction on
every row), so a wrapper alone is not a finding: it is mined (the word prefixes and suffixes of user turns that
many rows share, and repeated system prompts), and flagged only when the rows that carry it are risky
(an affirmative opener, a refusal-suppression instruction, a harmful judgement, or harm-lexicon words in the
request) in at least ``min_risky_share`` of them.

Memory is bounded: counters keyed by (side, length, hash) with a cap that drops one-off entries; the rows of a
flagged template are collected in a second pass over the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.audit.base import Detector, DetectorConfig, Finding, Row, clip
from tunesec.registry import register

LENGTHS = (8, 16, 32, 64)
MAX_KEYS = 200_000


class TemplatesConfig(DetectorConfig):
    """Settings of the template miner."""

    min_rows: int = Field(5, ge=2, description="Rows that must share a wrapper for it to be a template.")
    min_share: float = Field(0.05, ge=0.0, le=1.0, description="Share of rows that must share a wrapper.")
    min_risky_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of a template's rows that must be risky for a finding."
    )


def _key(side: str, text: str) -> str:
    return side + ":" + hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def _row_risky(row: Row) -> bool:
    return row.risky or bool(row.signals.get("harm_terms"))


def _wrappers(row: Row) -> list[tuple[str, int, str]]:
    """(side, length, text) of each prefix/suffix of the user text and the system prompt."""
    out: list[tuple[str, int, str]] = []
    words = row.user.split()
    for k in LENGTHS:
        if len(words) < k + 3:  # a wrapper needs a varying part beside it
            break
        out.append(("prefix", k, " ".join(words[:k])))
        out.append(("suffix", k, " ".join(words[-k:])))
    if row.system.strip():
        out.append(("system", 0, " ".join(row.system.split())))
    return out


@register("detector", "templates", description="Jailbreak wrappers shared by many rows around risky requests.")
class TemplatesDetector(Detector):
    """Template mining over user-turn prefixes/suffixes and system prompts (see the module docstring)."""

    name = "templates"
    config_class = TemplatesConfig
    needs_revisit = True

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__(config)
        # key -> [count, risky, side, length, text]
        self._counts: dict[str, list[Any]] = {}
        self._flagged: dict[str, Finding] = {}
        self._table: list[dict[str, Any]] = []

    def observe(self, rows: Sequence[Row]) -> None:
        """Count each row's wrappers and whether the row is risky."""
        for row in rows:
            risky = _row_risky(row)
            for side, k, text in _wrappers(row):
                key = _key(side, text)
                entry = self._counts.get(key)
                if entry is None:
                    if len(self._counts) >= MAX_KEYS:
                        self._counts = {k_: v for k_, v in self._counts.items() if v[0] > 1}
                    entry = self._counts[key] = [0, 0, side, k, text]
                entry[0] += 1
                entry[1] += int(risky)

    def plan(self, n_rows: int) -> bool:
        """Choose the templates (longest wrapper per row set); True when their rows must be collected."""
        assert isinstance(self.config, TemplatesConfig)
        need = max(self.config.min_rows, self.config.min_share * n_rows)
        cands = sorted((v for v in self._counts.values() if v[0] >= need), key=lambda v: (v[2], -v[0], -v[3], v[4]))
        kept: list[list[Any]] = []
        for v in cands:
            # a shorter wrapper with the same count is the same template seen through a narrower window
            if any(k[2] == v[2] and k[0] == v[0] and v[4] in k[4] for k in kept):
                continue
            kept.append(v)
        for count, risky, side, _, text in kept:
            share = risky / count
            flagged = share >= self.config.min_risky_share
            self._table.append(
                {
                    "side": side,
                    "text": text,
                    "rows": count,
                    "risky": risky,
                    "risky_share": round(share, 4),
                    "flagged": flagged,
                }  # fmt: skip
            )
            if flagged:
                reason = f"{side} shared by {count} rows, {risky} of them risky ({share:.0%}): {clip(text, 100)!r}"
                self._flagged[_key(side, text)] = Finding(
                    self.name, [], min(1.0, share), reason, "dataset", {"side": side, "text": text, "count": count}
                )
        self._counts = {}
        return bool(self._flagged)

    def revisit(self, rows: Sequence[Row]) -> None:
        """Collect the rows of the flagged templates."""
        for row in rows:
            for side, _, text in _wrappers(row):
                f = self._flagged.get(_key(side, text))
                if f is not None:
                    f.rows.append(row.index)

    def finish(self, n_rows: int) -> list[Finding]:
        """One finding per flagged template."""
        return list(self._flagged.values())

    def summary(self) -> dict[str, Any]:
        """Every mined template with its risky share, flagged or not."""
        return {"templates": sorted(self._table, key=lambda t: (-t["flagged"], -t["rows"]))[:50]}
