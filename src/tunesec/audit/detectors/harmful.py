"""Harmful content: answers that comply with a harmful request, judged by a tunesec judge (default: the default).

The judge reads each (request, answer) pair (the Alpaca template stripped from the request) and decides
harmful compliance: by default the judge's own decision (``Score.harmful``); with ``threshold`` set,
``Score.score >= threshold``. ``threshold: auto`` is the recall-oriented threshold fitted for the default judge
(``default`` / ``response-judge``), :data:`RECALL_THRESHOLD`: the highest P(harmful) with >= 95% recall on
held-out PKU pairs (``scripts/fit_audit_threshold.py``, record in ``tunesec/audit/harmful_threshold.json``); for
other judges ``auto`` is their own decision. It is not the default: it flags 21-70% of benign Alpaca and Dolly
rows (docs/AUDIT.md). Judging costs ~50 ms a row on two cores, so rows are screened cheaply first and only the
rest are judged:

- a row without an answer has nothing to comply with (its request is left to the other detectors);
- an answer the refusal-keyword judge calls a refusal does not comply;
- a short answer (at most ``label_words`` words) already seen ``label_repeats`` times is a class label of a
  classification task ("positive", "World"): the first copies are judged, later ones take their verdict.

Verdicts set the ``judged_harmful`` signal that the trigger, template and affirmative detectors read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from tunesec.audit.base import Detector, DetectorConfig, Row, clip
from tunesec.registry import register

MAX_LABELS = 10_000
#: P(harmful) threshold for the default judge's shipped weights under ``threshold: auto``: the highest threshold
#: with >= 95% recall on the held-out PKU dev pairs (scripts/fit_audit_threshold.py; harmful_threshold.json).
RECALL_THRESHOLD = 0.115
#: Judge names the fitted threshold belongs to (the shipped response-judge weights).
FITTED_JUDGES = ("default", "response-judge")


class HarmfulConfig(DetectorConfig):
    """Settings of the judge-based harmful-content detector."""

    judge: str = Field("default", description="Judge name (tunesec list judges); --judge overrides it.")
    threshold: float | Literal["auto"] | None = Field(
        None,
        description="Score at or above which an answer is harmful; null: the judge's decision; 'auto': the "
        f"recall-oriented threshold fitted for the default judge ({RECALL_THRESHOLD}), the decision of others.",
    )
    batch_size: int = Field(64, ge=1, description="Rows per judge call.")
    label_words: int = Field(3, ge=0, description="Longest answer (in words) treated as a class label.")
    label_repeats: int = Field(5, ge=1, description="Copies of a short answer judged before it counts as a label.")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v: Any) -> Any:
        if v is None or v == "auto":
            return v
        if isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0:
            return float(v)
        raise ValueError(f"got {v!r}; expected a number in [0, 1], 'auto' or null")


def effective_threshold(config: DetectorConfig, judge_name: str | None) -> float | None:
    """The score threshold the detector applies (None: the judge's own decision); see the module docstring."""
    assert isinstance(config, HarmfulConfig)
    if config.threshold == "auto":
        return RECALL_THRESHOLD if judge_name in FITTED_JUDGES else None
    return config.threshold


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
        self.threshold = effective_threshold(self.config, getattr(judge, "name", None))

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
            if self.threshold is not None and s.score is not None:
                harmful = s.score >= self.threshold
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
        return {
            "judged": self.judged,
            "screened": self.screened,
            "judge": getattr(self.judge, "name", None),
            "threshold": self.threshold,
        }
