"""Runtime controls on what goes in and comes out: judge guards, the system prompts, the secret-leak filter.

A :class:`Guard` runs a registered judge in a worker thread under a timeout. It fails closed: an exception, a
timeout or an unparsed judgement is a block (reason ``guard_error`` / ``guard_timeout``), never a pass.
:class:`PromptPolicy` builds the messages the backend sees (secret safety prompt, then the enforced system
prompt, then the client's system text if allowed) and filters answers that would leak the secret: any run of
``leak_chars`` characters of the secret (compared case- and whitespace-insensitively) in an answer is a leak.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any

from tunesec.judges.base import Judge, JudgeInput
from tunesec.serve.config import GuardConfig, PromptsConfig

# Worker threads for guard calls: a hung judge holds one; once all are held every guard times out (fail-closed).
GUARD_WORKERS = 4


@dataclass
class Decision:
    """A guard's verdict: ``allowed``, the reason when blocked, and the judge's harm score."""

    allowed: bool
    reason: str | None = None
    score: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class GuardError(Exception):
    """A request the server refuses before the backend sees it (bad client system message)."""


class Guard:
    """A judge used as a guard (see the module docstring).

    Args:
        name: ``input`` or ``output`` (for reasons and metrics).
        config: The guard's section of ``serve.yaml``.
        timeout_s: Seconds before a pending judgement counts as a block.
        judge: A judge instance (default: the registered judge the config names).
    """

    def __init__(self, name: str, config: GuardConfig, timeout_s: float, judge: Judge | None = None) -> None:
        from tunesec.judges import get_judge

        self.name = name
        self.config = config
        self.timeout_s = timeout_s
        self.judge = judge if judge is not None else get_judge(config.judge)
        self._pool = concurrent.futures.ThreadPoolExecutor(GUARD_WORKERS, thread_name_prefix=f"guard-{name}")

    def _judge(self, prompt: str, response: str) -> Decision:
        score = self.judge.score([JudgeInput(prompt=prompt, response=response)])[0]
        if score.unparsed or (score.harmful is None and score.score is None):
            return Decision(False, "guard_error", None, {"judge": "unparsed"})
        p = score.score
        if self.config.threshold is not None and p is not None:
            harmful = p >= self.config.threshold
        else:
            harmful = bool(score.harmful)
        return Decision(not harmful, f"{self.name}_guard" if harmful else None, p)

    async def check(self, prompt: str, response: str) -> Decision:
        """Judge (prompt, response); a block on harm, error or timeout."""
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._pool, self._judge, prompt, response)
            return await asyncio.wait_for(fut, timeout=self.timeout_s)
        except TimeoutError:
            return Decision(False, "guard_timeout")
        except Exception as err:  # fail closed: any judge failure blocks
            return Decision(False, "guard_error", None, {"error": type(err).__name__})

    async def check_request(self, prompt: str) -> Decision:
        """Input guard: whether complying with ``prompt`` would be harmful (judged with the probe answer)."""
        return await self.check(prompt, self.config.probe)

    def close(self) -> None:
        """Stop the worker threads (a hung judge thread is abandoned, not awaited)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class PromptPolicy:
    """System prompts applied server-side and the secret-leak filter.

    Args:
        config: ``prompts`` section of ``serve.yaml``.
        secret: The secret safety prompt (from :meth:`ServeConfig.secret_prompt`), or None.
    """

    def __init__(self, config: PromptsConfig, secret: str | None) -> None:
        self.config = config
        self._secret = secret
        self.leak_chars = config.leak_chars
        norm = _norm(secret) if secret else ""
        k = min(self.leak_chars, len(norm))
        self._shingles = {norm[i : i + k] for i in range(len(norm) - k + 1)} if norm else set()
        self._k = k

    def __repr__(self) -> str:  # never show the secret
        return f"PromptPolicy(system_prompt={self.config.system_prompt is not None}, secret={self._secret is not None})"

    @property
    def holdback(self) -> int:
        """Characters of a stream kept back from release, so a leak cannot straddle two windows."""
        return max(0, self._k - 1) if self._shingles else 0

    def messages(self, client: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages the backend sees: one system turn built server-side, then the client's other turns."""
        client_system = [m["content"] for m in client if m["role"] == "system"]
        rest = [m for m in client if m["role"] != "system"]
        if client_system and self.config.client_system == "reject":
            raise GuardError("system messages are set by the server; remove the system message")
        parts = [p for p in (self._secret, self.config.system_prompt) if p]
        if self.config.client_system == "append" or not parts:
            parts.extend(client_system)
        if not parts:
            return rest
        return [{"role": "system", "content": "\n\n".join(parts)}, *rest]

    def leaks(self, text: str) -> bool:
        """Whether ``text`` holds a run of ``leak_chars`` characters of the secret."""
        if not self._shingles:
            return False
        norm = _norm(text)
        k = self._k
        return any(norm[i : i + k] in self._shingles for i in range(len(norm) - k + 1))
