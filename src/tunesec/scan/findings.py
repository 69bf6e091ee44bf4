"""What a scan reports: findings with a severity and a reason, per file.

A finding of severity ``info`` is a note (what was read, e.g. a default system prompt or the licence); every
other severity (``low`` to ``critical``) counts as a finding and makes ``tunesec scan`` exit with 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("info", "low", "medium", "high", "critical")


@dataclass
class Finding:
    """One observation about one file of the artifact.

    Attributes:
        check: The check that made it (``pickle``, ``safetensors``, ``gguf``, ``template``, ``adapter``,
            ``architecture``, ``forensics``, ``provenance``).
        severity: One of :data:`SEVERITIES`; ``info`` is a note, not a finding.
        file: The file, relative to the scanned path (``.`` for the path itself).
        reason: One sentence saying what was seen and why it matters.
        detail: Machine-readable facts behind the reason (offsets, names, rendered text).
    """

    check: str
    severity: str
    file: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r}: expected one of {', '.join(SEVERITIES)}")

    @property
    def flagged(self) -> bool:
        """Whether this counts as a finding (anything above ``info``)."""
        return self.severity != "info"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def severity_rank(severity: str) -> int:
    """Order of a severity (``info`` = 0 ... ``critical`` = 4)."""
    return SEVERITIES.index(severity)
