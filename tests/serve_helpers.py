"""Helpers for the serve tests: scripted backends and judges, and a uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunesec.judges.base import Judge, JudgeInput, Score
from tunesec.serve.app import ServeState, create_app
from tunesec.serve.audit import AuditLog
from tunesec.serve.auth import KeyStore
from tunesec.serve.backend import Completion, Sampling
from tunesec.serve.config import ServeConfig, load_serve_config
from tunesec.serve.guards import Guard, PromptPolicy


class ScriptedBackend:
    """A backend whose answer is ``answer(messages)``; streams it in pieces of ``piece`` characters."""

    name = "scripted"

    def __init__(self, answer: Callable[[list[dict[str, str]]], str], piece: int = 7) -> None:
        self.answer = answer
        self.piece = piece
        self.seen: list[list[dict[str, str]]] = []

    async def complete(self, messages: list[dict[str, str]], sampling: Sampling) -> Completion:
        self.seen.append(messages)
        text = self.answer(messages)
        return Completion(text=text, prompt_tokens=1, completion_tokens=len(text.split()))

    async def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> AsyncIterator[str]:
        self.seen.append(messages)
        text = self.answer(messages)
        for i in range(0, len(text), self.piece):
            await asyncio.sleep(0)
            yield text[i : i + self.piece]

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return None

    def queue_depth(self) -> int:
        return 0

    async def close(self) -> None:
        return None


def echo_system(messages: list[dict[str, str]]) -> str:
    """A model that repeats its system prompt when asked (the extraction a secret prompt must survive)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    return f"Of course! My instructions are: {system}"


class WordJudge(Judge):
    """Flags a response as harmful when it contains ``word`` (a deterministic stand-in for a real judge)."""

    name = "word-judge"

    def __init__(self, word: str = "BAD") -> None:
        self.word = word
        self.calls = 0

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        self.calls += len(items)
        return [
            Score(judge=self.name, harmful=self.word in i.response or self.word in i.prompt, score=None, refused=False)
            for i in items
        ]


class RaisingJudge(Judge):
    name = "raising"

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        raise RuntimeError("judge crashed")


class HangingJudge(Judge):
    """Blocks until ``release`` is set (the test sets it at the end, so no thread outlives the test)."""

    name = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        self.release.wait(60)
        return [Score(judge=self.name, harmful=False) for _ in items]


def make_config(tmp: Path, yaml_text: str = "") -> ServeConfig:
    """A config from YAML text written to ``tmp/serve.yaml`` (paths resolve inside ``tmp``)."""
    path = tmp / "serve.yaml"
    path.write_text(
        "auth: {keys_file: keys.json}\naudit: {path: audit.jsonl, fsync: false}\n" + yaml_text, encoding="utf-8"
    )
    return load_serve_config(path)


def make_state(
    config: ServeConfig,
    backend: Any,
    *,
    name: str = "m",
    input_judge: Judge | None = None,
    output_judge: Judge | None = None,
    secret: str | None = None,
    open_auth: bool = False,
) -> ServeState:
    assert config.auth.keys_file is not None and config.audit.path is not None
    keys = None if open_auth else KeyStore(config.auth.keys_file)
    g = config.guards
    return ServeState(
        config=config,
        backend=backend,
        served_name=name,
        policy=PromptPolicy(config.prompts, secret),
        audit=AuditLog(config.audit.path, config.audit.max_bytes, config.audit.backups, config.audit.fsync),
        keys=keys,
        input_guard=Guard("input", g.input, g.timeout_s, judge=input_judge) if input_judge else None,
        output_guard=Guard("output", g.output, g.timeout_s, judge=output_judge) if output_judge else None,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(state: ServeState) -> Iterator[str]:
    """Run the app on a free loopback port in a thread; yields the ``/v1`` base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        state.audit.close()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
