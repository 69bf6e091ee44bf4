"""The one data schema: every dataset loads into :class:`Example` (a chat plus metadata)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant"]

_WORD = re.compile(r"\S+")


def count_words(text: str) -> int:
    """Number of whitespace-separated words in ``text``."""
    return sum(1 for _ in _WORD.finditer(text))


def last_sentence_end(text: str) -> int:
    """Index of the last sentence-ending mark in ``text`` that is followed by a space or line break (-1: none).

    Where a too-long answer is cut so that it still ends with a whole sentence.
    """
    return max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))


def first_words(text: str, k: int) -> str:
    """``text`` up to the end of its k-th word (all of it when shorter), its own spacing and line breaks kept.

    The prefix of a harmful answer that deep alignment trains on and the prefilling attack forces.
    """
    end = 0
    for i, m in enumerate(_WORD.finditer(text), start=1):
        end = m.end()
        if i == k:
            break
    return text[:end]


class Message(BaseModel):
    """One chat turn.

    ``loss_start`` (assistant turns only) is the number of leading characters of ``content`` that the turn is
    forced to begin with and that carry no training loss: the model sees them as context and learns the rest,
    e.g. the recovery after a harmful prefix in deep-alignment examples (Qi et al. 2024). ``weight`` 0
    (assistant turns only; OpenAI's fine-tuning format) keeps the whole turn out of the loss, e.g. an earlier
    turn of a multi-turn chat. Both are left out of serialised examples at their defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str
    loss_start: int = Field(0, ge=0, exclude_if=lambda v: v == 0)
    weight: Literal[0, 1] = Field(1, exclude_if=lambda v: v == 1)

    @model_validator(mode="after")
    def _loss_start_in_content(self) -> Message:
        if self.loss_start and self.role != "assistant":
            raise ValueError(f"loss_start: only an assistant turn can have one, not a {self.role} turn")
        if self.weight != 1 and self.role != "assistant":
            raise ValueError(f"weight: only an assistant turn can have one, not a {self.role} turn")
        if self.loss_start > len(self.content):
            raise ValueError(f"loss_start: {self.loss_start} is past the end of the content ({len(self.content)})")
        return self


class Example(BaseModel):
    """A chat (``messages``) plus metadata.

    For evaluation the chat ends with a user turn (the prompt); for training it ends with the assistant turn
    that is learned. ``label`` is the dataset's own label when it has one (``"harmful"``/``"benign"`` for
    safety sets, the class name for classification sets, the reference answer for GSM8K).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    messages: list[Message]
    source: str = ""
    category: str | None = None
    label: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("an example needs at least one message")
        return v

    @property
    def prompt_messages(self) -> list[Message]:
        """The messages up to (not including) a trailing assistant turn: what a model is asked."""
        if self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def prompt(self) -> str:
        """Text of the last user turn."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return ""

    @property
    def response(self) -> str | None:
        """Text of a trailing assistant turn, if any."""
        return self.messages[-1].content if self.messages[-1].role == "assistant" else None

    def chat(self) -> list[dict[str, str]]:
        """Messages as plain dicts (``role``/``content``), the form chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def prompt_chat(self) -> list[dict[str, str]]:
        """Prompt messages as plain dicts."""
        return [{"role": m.role, "content": m.content} for m in self.prompt_messages]
