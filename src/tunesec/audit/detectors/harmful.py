"""Harmful content: answers that comply with a harmful request, judged by a tunesec judge (default: the default).

The judge reads each (request, answer) pair (the Alpaca template stripped from the request) and decides
harmful compliance (``Score.harmful``; with ``threshold`` set, ``Score.score >= threshold`` instead). Judging
costs ~50 ms a row on two cores, so rows are screened cheaply first and only the rest are judged:

- a row without an answer has nothing to comply with (its request is left to the other detectors);
- an answer the refusal-keyword judge calls a refusal does not comply;
- a short answer (at most ``label_words`` words) already seen ``label_repeats`` times is a class label of a
  classification task ("positive", "World"): the first copies are judged, later ones take their verdict.

Verdicts set the ``judged_harmful`` signal that the trigger, template and affirmative detectors read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.audit.base import Detector, DetectorConfig, Row, clip
from tunesec.registry import register

MAX_LABELS = 10_000


class HarmfulConfig(DetectorConfig):
    """Settings of the judge-based harmful-content detector."""

    judge: str = Field("default", description="Judge name (tunesec list judges); --judge overrides it.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Score at or above which an answer is harmful; None: the judge's decision."
    )
    batch_size: int = Field(64, ge=1, description="Rows per judge call.")
    label_words: int = Field(3, ge=0, description="Longest answer (in words) treated as a class label.")
    label_repeats: int = Field(5, ge=1, description="Copies of a short answer judged before it counts as a label.")


@register(
    "detector", "harmful", description="Answers judged harmful compliance (default judge), screened cheaply first."
)
class HarmfulDetector(Detector):
    """Judge-based harmful content (see the module docstring)."""

    name = "harmful"
    config_class = HarmfulConfig
    needs_judge = True

    def __init__(self, config: DetectorConfig | None = None, judge: Any = None) -> None:
        super().__init__(config)
        self.judge = judge
        self._labels: Counter[str] = Counter()
        self._label_verdict: dict[str, bool] = {}
        self.judged = 0
        self.screened = 0

    def judge_rows(self, rows: Sequence[Row]) -> None:
        """Judge the rows that the screen does not settle; set each row's ``judged_harmful`` signal."""
        assert isinstance(self.config, HarmfulConfig)
        todo: list[Row] = []
        pending: list[tuple[Row, str]] = []  # repeated labels: they take the verdict of their judged copies
        for row in rows:
            answer = row.first_answer.strip()
            if not answer or row.signals.get("refusal"):
                row.signals["judged_harmful"] = False
                self.screened += 1
                continue
            key = " ".join(answer.lower().split())
            if len(key.split()) <= self.config.label_words:
                if self._labels[key] >= self.config.label_repeats:
                    pending.append((row, key))
                    self.screened += 1
                    continue
                if len(self._labels) < MAX_LABELS or key in self._labels:
                    self._labels[key] += 1
            todo.append(row)
        self._judge(todo)
        for row, key in pending:
            row.signals["judged_harmful"] = self._label_verdict.get(key, False)

    def _judge(self, todo: list[Row]) -> None:
        from tunesec.data.loaders import strip_alpaca_template
        from tunesec.judges.base import JudgeInput

        assert isinstance(self.config, HarmfulConfig)
        if not todo or self.judge is None:
            return
        items = [JudgeInput(prompt=strip_alpaca_template(r.user), response=r.first_answer) for r in todo]
        scores = []
        for start in range(0, len(items), self.config.batch_size):
            scores += self.judge.score(items[start : start + self.config.batch_size])
        self.judged += len(todo)
        for row, s in zip(todo, scores, strict=True):
            if self.config.threshold is not None and s.score is not None:
                harmful = s.score >= self.config.threshold
            else:
                harmful = bool(s.harmful) and not s.unparsed
            row.signals["judged_harmful"] = harmful
            row.signals["harm_score"] = s.score
            key = " ".join(row.first_answer.lower().split())
            if len(key.split()) <= self.config.label_words:
                # a label judged harmful once stays judged row by row
                self._label_verdict[key] = self._label_verdict.get(key, False) or harmful

    def observe(self, rows: Sequence[Row]) -> None:
        """Flag the rows judged harmful."""
        for row in rows:
            if row.signals.get("judged_harmful"):
                score = row.signals.get("harm_score")
                self.flag(
                    row,
                    float(score) if score is not None else 1.0,
                    f"answer judged harmful compliance by {getattr(self.judge, 'name', 'the judge')}"
                    + (f" (score {score:.2f})" if score is not None else "")
                    + f": {clip(row.first_answer, 60)!r}",
                )

    def summary(self) -> dict[str, Any]:
        """How many rows were judged and how many the cheap screen settled."""
        return {"judged": self.judged, "screened": self.screened, "judge": getattr(self.judge, "name", None)}
