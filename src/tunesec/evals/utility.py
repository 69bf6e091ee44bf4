"""The utility task: SST-2 and AG News accuracy, GSM8K exact match, scored by parsing (no judge).

Measures the task ability a fine-tuning defense may cost (the "utility" column of Vaccine, Lisa, Booster and
the rest of the harmful fine-tuning literature, which report SST-2, AG News and GSM8K accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.evals.metrics import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, MetricValue
from tunesec.evals.parsing import SENTIMENT_LABELS, TOPIC_LABELS, UtilityKind, infer_kind, normalize_label, parse_answer
from tunesec.evals.tasks import MetricSpec, Record, Task, base_record, check_lengths
from tunesec.judges.base import Judge
from tunesec.models.types import Generation, Prompt
from tunesec.registry import register

_INSTRUCTIONS: dict[UtilityKind, str] = {
    "sentiment": (
        "Classify the sentiment of the following sentence as positive or negative. "
        "Answer with one word.\n\nSentence: {text}\nSentiment:"
    ),
    "topic": (
        "Classify the topic of the following news article as World, Sports, Business or Sci/Tech. "
        "Answer with the category name.\n\nArticle: {text}\nTopic:"
    ),
    "math": "{text}\n\nSolve the problem step by step, then end with 'The final answer is: <number>'.",
}
_UTILITY_TOKENS: dict[UtilityKind, int] = {"sentiment": 16, "topic": 16, "math": 256}


@register(
    "task",
    "utility",
    description="Task accuracy: SST-2 and AG News label accuracy, GSM8K exact match of the final number.",
    default_dataset="sst2",
    default_judge=None,
)
class UtilityTask(Task):
    """Utility kept after fine-tuning: accuracy on SST-2 and AG News, exact match on GSM8K.

    The sub-task is taken from each example's source (``sst2``, ``agnews``, ``gsm8k``) or, failing that, from
    the label's form; ``kind`` forces one. Scoring needs no judge: the label word (or the final number, after
    ``####`` or "final answer is") is parsed from the response; a response with no parsable answer is wrong
    and counted in ``unparsed_rate``. A prompt that does not already state the answer format gets a short
    instruction (see ``_INSTRUCTIONS``). Defaults: SST-2 validation, 16 new tokens (256 for GSM8K).

    ``scoring="choices"`` (SST-2 and AG News) asks the model for its most likely label instead of parsing a
    generated answer, as lm-eval scores classification: it measures what a small chat model knows when it does
    not follow the answer format (SmolLM2-135M describes AG News articles instead of naming a class: 81% of its
    generated answers name none). It needs a local model (token log-probabilities), not an API endpoint.

    Args:
        kind: ``auto`` (per example) or one of ``sentiment``, ``topic``, ``math``.
        scoring: ``generate`` (parse the answer) or ``choices`` (the most likely label).
    """

    name = "utility"
    default_dataset = "sst2"
    default_judge = None
    max_new_tokens = 16
    primary_metric = "accuracy"

    def __init__(
        self,
        kind: Literal["auto", "sentiment", "topic", "math"] = "auto",
        scoring: Literal["generate", "choices"] = "generate",
    ) -> None:
        if kind not in ("auto", "sentiment", "topic", "math"):
            raise UsageError(f"utility task: kind {kind!r}: expected auto, sentiment, topic or math")
        if scoring not in ("generate", "choices"):
            raise UsageError(f"utility task: scoring {scoring!r}: expected generate or choices")
        self.kind = kind
        self.scoring = scoring

    def spec(self) -> dict[str, Any]:
        """Name, sub-task and scoring options (``scoring`` only when not the default, so earlier runs resume)."""
        spec: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.scoring != "generate":
            spec["scoring"] = self.scoring
        return spec

    def choices(self, examples: Sequence[Example]) -> list[list[str]] | None:
        """With ``scoring="choices"``: the class labels of each example's sub-task (SST-2, AG News only)."""
        if self.scoring == "generate":
            return None
        out: list[list[str]] = []
        for ex in examples:
            kind = self.kind_of(ex)
            if kind == "math":
                raise UsageError(f"example {ex.id}: scoring=choices needs a label task (sst2, agnews), not gsm8k")
            out.append(list(SENTIMENT_LABELS if kind == "sentiment" else TOPIC_LABELS))
        return out

    def kind_of(self, example: Example) -> UtilityKind:
        """The sub-task of one example."""
        if self.kind != "auto":
            return self.kind
        source = " ".join(str(x) for x in (example.source, example.meta.get("dataset", "")) if x)
        kind = infer_kind(source, example.label)
        if kind is None:
            raise UsageError(
                f"example {example.id}: cannot tell the utility sub-task from source {example.source!r} and "
                f"label {example.label!r}; expected an sst2/agnews/gsm8k example, or UtilityTask(kind=...)"
            )
        return kind

    def default_max_new_tokens(self, examples: Sequence[Example]) -> int:
        """16 tokens for label answers, 256 when any example is a math problem."""
        return max((_UTILITY_TOKENS[self.kind_of(ex)] for ex in examples), default=self.max_new_tokens)

    def build_prompts(self, examples: Sequence[Example]) -> list[Prompt]:
        """The example's chat, with the answer-format instruction added when the prompt lacks it."""
        prompts: list[Prompt] = []
        for ex in examples:
            chat = ex.prompt_chat()
            kind = self.kind_of(ex)
            text = chat[-1]["content"]
            if chat[-1]["role"] == "user" and not _states_format(kind, text):
                chat[-1] = {"role": "user", "content": _INSTRUCTIONS[kind].format(text=text)}
            prompts.append(chat)
        return prompts

    def score(
        self, examples: Sequence[Example], generations: Sequence[Generation], judge: Judge | None
    ) -> list[Record]:
        """Parse each response and compare it to the reference label."""
        check_lengths(examples, generations)
        prompts = self.build_prompts(examples)
        records = []
        for ex, p, g in zip(examples, prompts, generations, strict=True):
            kind = self.kind_of(ex)
            if ex.label is None:
                raise UsageError(f"example {ex.id}: utility needs the reference answer in its label")
            try:
                reference = normalize_label(kind, ex.label)
            except ValueError as err:
                raise UsageError(f"example {ex.id}: label: {err}") from None
            answer = parse_answer(kind, g.text)
            rec = base_record(ex, p, g)
            if g.choice_logprobs is not None:
                rec["choice_logprobs"] = g.choice_logprobs
            rec.update(
                {
                    "kind": kind,
                    "reference": _show(reference),
                    "parsed": None if answer is None else _show(answer),
                    "correct": answer is not None and answer == reference,
                }
            )
            records.append(rec)
        return records

    def metric_specs(self) -> list[MetricSpec]:
        """Accuracy (exact match for GSM8K) and the rate of responses with no parsable answer."""
        return [
            MetricSpec("accuracy", "rate", lambda r: bool(r.get("correct")), "Accuracy / exact match"),
            MetricSpec("unparsed_rate", "rate", lambda r: r.get("parsed") is None, "No parsable answer"),
        ]

    def metrics(
        self,
        records: Sequence[Mapping[str, Any]],
        confidence: float = DEFAULT_CONFIDENCE,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = DEFAULT_SEED,
    ) -> dict[str, MetricValue]:
        """Metrics broken down by category, or by sub-task when examples carry no category."""
        if any(r.get("category") for r in records):
            return super().metrics(records, confidence, n_resamples, seed)
        by_kind = [{**r, "category": r.get("kind")} for r in records]
        return super().metrics(by_kind, confidence, n_resamples, seed)


def _states_format(kind: UtilityKind, text: str) -> bool:
    low = text.lower()
    if kind == "sentiment":
        return "positive" in low and "negative" in low
    if kind == "topic":
        return all(label.lower() in low for label in TOPIC_LABELS)
    return "final answer" in low or "final number" in low or "####" in low


def _show(value: str | Decimal) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return value
