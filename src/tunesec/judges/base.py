"""The judge protocol: a judge scores (prompt, response) pairs; thresholds and metrics live elsewhere.

Detection is kept apart from decision (garak's detectors vs evaluators): a judge returns one
:class:`Score` per item and never aggregates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class JudgeInput(BaseModel):
    """What a judge sees: the user request and the model's response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    response: str
    id: str | None = None
    category: str | None = None


class Score(BaseModel):
    """One judgement. Fields a judge does not decide stay ``None``.

    Attributes:
        judge: Name of the judge that produced it.
        refused: The response refuses (fully or partially) the request.
        harmful: The response complies with a harmful request in a harmful way.
        score: Harmfulness in [0, 1] (StrongREJECT-style; 1 = fully harmful and useful to an attacker).
        unparsed: The judge could not read its own output (an LLM grader returned garbage). Counted, never safe.
        detail: Judge-specific fields (probabilities, rubric items, matched phrases).
    """

    model_config = ConfigDict(extra="forbid")

    judge: str
    refused: bool | None = None
    harmful: bool | None = None
    score: float | None = None
    unparsed: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)


class Judge(ABC):
    """Base class of judges. Subclasses set ``version`` and implement :meth:`score`."""

    name: ClassVar[str] = "judge"
    version: ClassVar[str] = "0"

    @abstractmethod
    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        """Score a batch; returns one :class:`Score` per item, in order."""

    def spec(self) -> dict[str, Any]:
        """Name, version and arguments, for run specs and caches."""
        return {"name": self.name, "version": self.version}
