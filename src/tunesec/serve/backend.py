"""What the server asks of a backend: a completion, a stream of text, token counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters of one request."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    """One finished answer."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


class BackendError(Exception):
    """The backend failed to answer (upstream down, generation error); the client gets a 502/503."""


class Backend(Protocol):
    """A local engine or an upstream server."""

    name: str

    async def complete(self, messages: Chat, sampling: Sampling) -> Completion:
        """The whole answer."""
        ...

    def stream(self, messages: Chat, sampling: Sampling) -> AsyncIterator[str]:
        """The answer as text deltas."""
        ...

    def count_tokens(self, messages: Chat) -> int | None:
        """Prompt tokens as the model counts them, or None when unknown (upstream)."""
        ...

    def queue_depth(self) -> int:
        """Requests waiting for the engine."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...
