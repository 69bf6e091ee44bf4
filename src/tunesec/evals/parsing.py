"""Answer extraction for the utility task: a label word for SST-2 / AG News, the final number for GSM8K.

Extraction is kept apart from scoring (lm-eval's filters): each function returns the parsed answer or ``None``
when the response holds none, and the task counts ``None`` as wrong and reports how many there were.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

UtilityKind = Literal["sentiment", "topic", "math"]

SENTIMENT_LABELS = ("negative", "positive")
# AG News class order (classes.txt): 1 World, 2 Sports, 3 Business, 4 Sci/Tech.
TOPIC_LABELS = ("World", "Sports", "Business", "Sci/Tech")

_SENTIMENT_RE = re.compile(r"\b(positive|negative)\b", re.IGNORECASE)
_TOPIC_RE = re.compile(
    r"\b(sci\s*/\s*tech|sci-tech|science(?:\s+and|\s*&)?\s*technology|science|technology|tech"
    r"|world|sports?|business)\b",
    re.IGNORECASE,
)
# A run of two or more class names joined only by list separators ("World, Sports, Business, Sci/Tech",
# "positive or negative") is the question's option list repeated, not an answer: it is removed before parsing.
# "Sci/" covers a list cut off by the token limit. "positive, not negative" is not a list and stays.
_LIST_SEP = r"(?:\s*,\s*(?:or\s+|and\s+)?|\s+or\s+|\s+and\s+|\s*/\s*)"
_SENTIMENT_LIST_RE = re.compile(rf"\b(?:positive|negative)(?:{_LIST_SEP}(?:positive|negative)\b)+", re.IGNORECASE)
_TOPIC_WORD = r"(?:sci\s*/\s*tech\b|sci/|world\b|sports?\b|business\b)"
_TOPIC_LIST_RE = re.compile(rf"\b{_TOPIC_WORD}(?:{_LIST_SEP}{_TOPIC_WORD})+", re.IGNORECASE)
_TOPIC_CANON = {
    "world": "World",
    "sport": "Sports",
    "sports": "Sports",
    "business": "Business",
}
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_HASH_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_FINAL_RE = re.compile(r"(?:final answer|the answer)\s*(?:is)?\s*[:=]?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER_RE = re.compile(_NUMBER)


def parse_sentiment(response: str) -> str | None:
    """The first ``positive``/``negative`` word in ``response`` (lower case), or ``None``.

    Example:
        >>> parse_sentiment("The answer is positive.")
        'positive'
    """
    m = _SENTIMENT_RE.search(_without_lists(_SENTIMENT_LIST_RE, response))
    return m.group(1).lower() if m else None


def parse_topic(response: str) -> str | None:
    """The first AG News class named in ``response`` (canonical spelling, e.g. ``Sci/Tech``), or ``None``.

    A repeated option list ("World, Sports, Business, Sci/Tech") is not an answer and is skipped.

    Example:
        >>> parse_topic("World, Sports, Business, Sci/Tech")  # the options echoed: no answer
        >>> parse_topic("The topic is Sports.")
        'Sports'
    """
    m = _TOPIC_RE.search(_without_lists(_TOPIC_LIST_RE, response))
    if not m:
        return None
    word = re.sub(r"\s+", " ", m.group(1).lower())
    return _TOPIC_CANON.get(word, "Sci/Tech")


def _without_lists(regex: re.Pattern[str], response: str) -> str:
    """``response`` with every run of two or more distinct class names (an echoed option list) blanked out."""

    def blank(m: re.Match[str]) -> str:
        names = {re.sub(r"\W+", "", w.lower()).rstrip("s") for w in re.split(_LIST_SEP, m.group(0)) if w.strip()}
        return " " if len(names) >= 2 else m.group(0)

    return regex.sub(blank, response)


def parse_number(text: str) -> Decimal | None:
    r"""The final number in ``text``: after ``####``, else after "final answer is", else the last number.

    GSM8K references end in ``#### 42``; models are asked for "The final answer is: 42". Commas, a dollar sign
    and a trailing period are ignored.

    Example:
        >>> parse_number("so she makes $18.\\n#### 18")
        Decimal('18')
    """
    for regex in (_HASH_RE, _FINAL_RE):
        found = regex.findall(text)
        if found:
            return _to_decimal(found[-1])
    found = _ANY_NUMBER_RE.findall(text)
    return _to_decimal(found[-1]) if found else None


def normalize_label(kind: UtilityKind, label: str) -> str | Decimal:
    """The reference answer of an example in the form the parser returns.

    Args:
        kind: Which utility sub-task.
        label: ``Example.label``: ``positive``/``negative`` or ``0``/``1`` for SST-2; a class name or
            ``1``-``4`` for AG News; a number or a full GSM8K solution ending in ``#### N`` for GSM8K.

    Raises:
        ValueError: The label is not one of the forms above.
    """
    text = label.strip()
    if kind == "sentiment":
        if text in ("0", "1"):
            return SENTIMENT_LABELS[int(text)]
        if text.lower() in SENTIMENT_LABELS:
            return text.lower()
        raise ValueError(f"expected positive/negative or 0/1, got {label!r}")
    if kind == "topic":
        if text in ("1", "2", "3", "4"):
            return TOPIC_LABELS[int(text) - 1]
        parsed = parse_topic(text)
        if parsed is None:
            raise ValueError(f"expected one of {', '.join(TOPIC_LABELS)} or 1-4, got {label!r}")
        return parsed
    number = parse_number(text)
    if number is None:
        raise ValueError(f"expected a number (or a solution ending in '#### N'), got {label[:60]!r}")
    return number


def parse_answer(kind: UtilityKind, response: str) -> str | Decimal | None:
    """Parse a model's response for the given utility sub-task."""
    if kind == "sentiment":
        return parse_sentiment(response)
    if kind == "topic":
        return parse_topic(response)
    return parse_number(response)


def infer_kind(source: str, label: str | None) -> UtilityKind | None:
    """Guess the utility sub-task from the dataset name or, failing that, from the label's form."""
    s = source.lower().replace("_", "").replace("-", "")
    if "sst" in s:
        return "sentiment"
    if "agnews" in s:
        return "topic"
    if "gsm" in s:
        return "math"
    if label is None:
        return None
    text = label.strip()
    if text.lower() in SENTIMENT_LABELS:
        return "sentiment"
    if text in TOPIC_LABELS:
        return "topic"
    if "####" in text or _to_decimal(text) is not None:
        return "math"
    return None


def _to_decimal(raw: str) -> Decimal | None:
    cleaned = raw.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None
