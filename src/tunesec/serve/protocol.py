"""The OpenAI chat-completions wire format: the request model, errors in OpenAI's shape, response bodies.

A request parameter the server does not implement is a 400 naming it (as OpenAI answers an unknown argument),
never silently ignored; so is a value it cannot honour (``n`` > 1, non-zero penalties, log-probabilities).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with HTTP ``status``."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; ``developer`` is taken as ``system``."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    """``stream_options``: usage chunks are not produced, so only ``include_usage: false`` is accepted."""

    model_config = ConfigDict(extra="forbid")
    include_usage: Literal[False] = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions`` body: the parameters this server honours."""

    model_config = ConfigDict(extra="forbid", strict=False)
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None

    def stops(self) -> list[str]:
        """Stop strings (non-empty ones)."""
        raw = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in raw if s]


def parse_request(data: Any) -> ChatRequest:
    """Validate a decoded JSON body; a 400 naming the first bad parameter otherwise."""
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if first["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'", param=param) from None
        raise ApiError(400, f"Invalid value for '{param}': {first['msg']}", param=param) from None


def completion_body(rid: str, model: str, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {  # all three fields always, as OpenAI sends them (clients add them up)
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0),
        },
    }


def chunk_body(rid: str, model: str, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
