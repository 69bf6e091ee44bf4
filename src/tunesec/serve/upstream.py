"""The upstream backend: any OpenAI-compatible server (vLLM, llama.cpp, a provider) behind the guards.

Requests go out with ``httpx`` under a timeout, retried with exponential backoff on connection errors, 429 and
5xx (a stream only before its first byte: a half-sent answer is never replayed). The upstream key comes from the
environment variable the config names and is never logged.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from tunesec.serve.backend import BackendError, Chat, Completion, Sampling


class UpstreamBackend:
    """Chat completions from an upstream OpenAI-compatible ``base_url`` for model ``model``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8001/v1``.
        model: The upstream's model name.
        api_key_env: Variable holding the upstream's key (optional).
        timeout_s: Seconds per request.
        retries: Retries before giving up.
        transport: An httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 2,
        transport: Any = None,
    ) -> None:
        import httpx

        self.name = model
        self.model = model
        self.retries = retries
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def __repr__(self) -> str:
        return f"UpstreamBackend(base_url={str(self._client.base_url)!r}, model={self.model!r})"

    def _body(self, messages: Chat, sampling: Sampling, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": stream,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(8.0, 0.25 * 2**attempt))

    async def complete(self, messages: Chat, sampling: Sampling) -> Completion:
        """POST ``/chat/completions`` with retries."""
        import httpx

        body = self._body(messages, sampling, stream=False)
        last = "no attempt"
        for attempt in range(self.retries + 1):
            try:
                resp = await self._client.post("/chat/completions", json=body)
            except httpx.HTTPError as err:
                last = type(err).__name__
            else:
                if resp.status_code == 200:
                    return _parse(resp)
                last = f"HTTP {resp.status_code}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise BackendError(f"upstream answered {last}")
            if attempt < self.retries:
                await self._backoff(attempt)
        raise BackendError(f"upstream failed after {self.retries + 1} attempts ({last})")

    async def stream(self, messages: Chat, sampling: Sampling) -> AsyncIterator[str]:
        """Text deltas of an upstream SSE stream (retried only until the first byte)."""
        import httpx

        body = self._body(messages, sampling, stream=True)
        last = "no attempt"
        for attempt in range(self.retries + 1):
            try:
                async with self._client.stream("POST", "/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        last = f"HTTP {resp.status_code}"
                        if resp.status_code != 429 and resp.status_code < 500:
                            raise BackendError(f"upstream answered {last}")
                    else:
                        async for line in resp.aiter_lines():
                            delta = _sse_delta(line)
                            if delta is None:
                                break
                            if delta:
                                yield delta
                        return
            except httpx.HTTPError as err:
                last = type(err).__name__
            if attempt < self.retries:
                await self._backoff(attempt)
        raise BackendError(f"upstream stream failed after {self.retries + 1} attempts ({last})")

    def count_tokens(self, messages: Chat) -> int | None:
        """Unknown for an upstream (the character limit applies)."""
        return None

    def queue_depth(self) -> int:
        """The upstream queues for itself."""
        return 0

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _parse(resp: Any) -> Completion:
    try:
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=str(choice.get("finish_reason") or "stop"),
        )
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise BackendError(f"upstream answer is not a chat completion ({type(err).__name__})") from None


def _sse_delta(line: str) -> str | None:
    """The content delta of one SSE line ('' for lines without one), None at ``[DONE]``."""
    if not line.startswith("data:"):
        return ""
    payload = line[5:].strip()
    if payload == "[DONE]":
        return None
    try:
        chunk = json.loads(payload)
        choices = chunk.get("choices") or [{}]
        return str((choices[0].get("delta") or {}).get("content") or "")
    except (ValueError, AttributeError, TypeError):
        raise BackendError("upstream stream sent a malformed chunk") from None
