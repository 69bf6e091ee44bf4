"""The audit's core types: a row of the data, a finding, and the detector protocol.

A detector sees the data once, in order, a chunk of rows at a time (:meth:`Detector.observe`), and reports at
the end (:meth:`Detector.finish`). Row-level detectors (PII, encodings, identity shift) report as they go;
dataset-level detectors (templates, triggers, duplicates) keep bounded counters and report at the end, naming
the rows a finding covers. Every finding has a score in [0, 1] and a reason a person can check.

Detection and decision are kept apart (garak's detectors and evaluator): detectors only report; the policy
(:mod:`tunesec.audit.policy`) decides which findings fail the audit and which rows ``--filter`` removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from tunesec.config import Config


@dataclass
class Row:
    """One row of the audited data, as text by role.

    Attributes:
        index: 0-based position among the rows read (skipped malformed lines are not counted).
        where: Location in the file for messages (``line 7``, ``item 3``, ``row 2``).
        system: The system prompt(s), joined by blank lines ("" when none).
        user: The user turns, joined by blank lines.
        assistant: The assistant turns, joined by blank lines ("" when the row has no answer).
        first_answer: The last assistant turn alone (what a fine-tune learns to say).
        signals: Cheap per-row facts the runner computes once (``affirmative``, ``refusal``, ``suppression``,
            ``harm_terms``, ``judged_harmful``) and detectors read.
    """

    index: int
    where: str
    system: str
    user: str
    assistant: str
    first_answer: str = ""
    signals: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """All the row's text, system first."""
        return "\n\n".join(t for t in (self.system, self.user, self.assistant) if t)

    @property
    def risky(self) -> bool:
        """The row teaches compliance with something risky.

        An affirmative opener, a refusal-suppression instruction, or an answer the judge found harmful; a refusal
        counts only when the judge found it harmful anyway.
        """
        s = self.signals
        if s.get("refusal"):
            return bool(s.get("judged_harmful"))
        return bool(s.get("affirmative") or s.get("suppression") or s.get("judged_harmful"))


@dataclass
class Finding:
    """One thing a detector found: the rows it covers, a score in [0, 1] and why.

    ``rows`` is one row index for a row-level finding and several for a dataset-level one (a trigger, a
    template, a group of duplicates). ``data`` holds detector-specific facts (counts, p-values, the matched text).
    """

    detector: str
    rows: list[int]
    score: float
    reason: str
    kind: str = "row"
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self, where: dict[int, str] | None = None) -> dict[str, Any]:
        """The finding as a JSON object (with each row's location when ``where`` knows it)."""
        out: dict[str, Any] = {
            "detector": self.detector,
            "kind": self.kind,
            "rows": self.rows,
            "score": round(float(self.score), 6),
            "reason": self.reason,
        }
        if where is not None:
            out["where"] = [where.get(i, "") for i in self.rows[:50]]
        if self.data:
            out["data"] = self.data
        return out


class DetectorConfig(Config):
    """Settings every detector has; a detector's own config adds its parameters."""

    enabled: bool = Field(True, description="Run this detector.")
    max_share: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of rows this detector may flag before the audit fails (exit 1)."
    )
    filter: bool = Field(True, description="--filter removes the rows this detector flags.")


class Detector:
    """Base class of audit detectors: :meth:`observe` chunks of rows, then :meth:`finish`.

    Subclasses set ``name`` and ``config_class`` and are registered with
    ``@register("detector", NAME, description=...)``. ``needs_judge`` marks the one detector that needs a
    judge (the runner builds the judge only then).
    """

    name: ClassVar[str] = "detector"
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    needs_judge: ClassVar[bool] = False

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        self.findings: list[Finding] = []

    def observe(self, rows: Sequence[Row]) -> None:
        """See a chunk of rows (in file order); row-level detectors append findings here."""

    def finish(self, n_rows: int) -> list[Finding]:
        """All findings, after the last chunk."""
        return self.findings

    def summary(self) -> dict[str, Any]:
        """Detector-specific facts for audit.json beyond the findings (e.g. the candidate-trigger table)."""
        return {}

    def flag(self, row: Row, score: float, reason: str, **data: Any) -> None:
        """Record a row-level finding."""
        self.findings.append(Finding(self.name, [row.index], min(1.0, max(0.0, score)), reason, "row", data))


def clip(text: str, n: int = 80) -> str:
    """``text`` on one line, at most ``n`` characters (for reasons)."""
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"
