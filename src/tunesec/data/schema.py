"""The one data schema: every dataset loads into :class:`Example` (a chat plus metadata)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str


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
