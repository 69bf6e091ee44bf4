"""A black-box model behind an OpenAI-compatible chat endpoint (evaluation only: no weights to tune).

The key is read from the environment variable the ref names (default ``OPENAI_API_KEY``) and never logged or
written to a run spec. Requests go out concurrently with retries on 429/5xx.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.models.types import Generation, GenerationConfig, Prompt, as_chat
from tunesec.progress import console, make_progress

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIChatGenerator:
    """Chat completions from an OpenAI-compatible server (OpenAI, vLLM serve, llama.cpp server, ...).

    Args:
        ref: A ``kind="openai"`` ref (model name, base URL, key variable name).
        concurrency: Requests in flight at once.
        timeout: Seconds per request.
        max_retries: Retries on rate limits, server errors and timeouts, with exponential backoff.
    """

    def __init__(self, ref: ModelRef, concurrency: int = 8, timeout: float = 120.0, max_retries: int = 4) -> None:
        self.ref = ref
        self.name = f"openai:{ref.base}"
        self.base_url = (ref.api_base or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._key = os.environ.get(ref.api_key_env)
        if not self._key and "api.openai.com" in self.base_url:
            raise UsageError(f"model {self.name}: environment variable {ref.api_key_env} is not set")
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatGenerator(model={self.ref.base!r}, base_url={self.base_url!r})"

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        """Send one chat completion request per prompt; results keep the prompts' order."""
        import httpx

        cfg = config or GenerationConfig()
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        results: list[Generation] = []
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout) as client:
            with make_progress(enabled=progress) as bar:
                task = bar.add_task(f"generate {self.name}", total=len(prompts), info="")

                def one(prompt: Prompt) -> Generation:
                    gen = self._request(client, prompt, cfg)
                    bar.advance(task)
                    return gen

                with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                    results = list(pool.map(one, prompts))
        return results

    def _request(self, client: Any, prompt: Prompt, cfg: GenerationConfig) -> Generation:
        import httpx

        body: dict[str, Any] = {
            "model": self.ref.base,
            "messages": as_chat(prompt, cfg.system_prompt),
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature if cfg.do_sample else 0.0,
        }
        if cfg.do_sample:
            body["top_p"] = cfg.top_p
            body["seed"] = cfg.seed
        delay = 1.0
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            try:
                resp = client.post("/chat/completions", json=body)
            except httpx.HTTPError as err:
                if attempt == self.max_retries:
                    console.print(f"[yellow]{self.name}: request failed after retries ({type(err).__name__})[/]")
                    break
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt < self.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
            if resp.status_code in (401, 403):
                raise UsageError(
                    f"model {self.name}: endpoint refused the key in {self.ref.api_key_env} (HTTP {resp.status_code})"
                )
            if resp.status_code >= 400:
                raise UsageError(f"model {self.name}: endpoint answered HTTP {resp.status_code}: {resp.text[:200]}")
            data = resp.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Generation(
                text=choice["message"].get("content") or "",
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                seconds=round(time.perf_counter() - t0, 4),
            )
        return Generation(text="", finish_reason="error", seconds=time.perf_counter() - t0)
