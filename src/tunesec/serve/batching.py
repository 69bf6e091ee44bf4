"""The local backend: the generation engine behind a dynamic-batching queue.

Requests from concurrent clients go into one queue; a single worker thread takes the first, gathers more for up
to ``max_wait_ms`` (or until ``max_batch``), and decodes them with one ``generate`` call per group of requests
with the same decoding settings. Inside a call the engine batches continuously (finished rows leave, queued
prompts of that call join); requests arriving during a call wait for the next one. ``max_batch=1`` serves one
request at a time (the baseline of ``benchmarks/serve.py``).

The engine returns whole answers, so a streamed answer is the finished text sent in pieces: clients get the
stream format, and the output guard checks it window by window all the same.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunesec.models.types import GenerationConfig, Generator
from tunesec.serve.backend import BackendError, Chat, Completion, Sampling

# Characters per streamed chunk of a local answer.
STREAM_CHUNK_CHARS = 16


@dataclass
class _Pending:
    messages: Chat
    config: GenerationConfig
    future: asyncio.Future[Completion]
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)


def generation_config(sampling: Sampling) -> GenerationConfig:
    """The engine's settings for a request (temperature 0 is greedy)."""
    sample = sampling.temperature > 0
    return GenerationConfig(
        max_new_tokens=sampling.max_tokens,
        do_sample=sample,
        temperature=sampling.temperature if sample else 1.0,
        top_p=sampling.top_p if sample else 1.0,
        seed=sampling.seed or 0,
    )


class BatchingBackend:
    """A :class:`~tunesec.models.types.Generator` served through a dynamic-batching queue.

    Args:
        generator: The engine (``get_generator(model)``).
        max_batch: Most requests per engine call.
        max_wait_ms: How long to gather requests after the first one arrives.
        name: The served model name.
    """

    def __init__(self, generator: Generator, max_batch: int, max_wait_ms: float, name: str) -> None:
        self.generator = generator
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches: list[int] = []  # sizes of the engine calls made (for metrics and the benchmark)
        self.on_batch: Any = None  # callback(size) for metrics
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="serve-batcher", daemon=True)
        self._worker.start()

    def queue_depth(self) -> int:
        """Requests waiting for the engine."""
        return self._queue.qsize()

    def count_tokens(self, messages: Chat) -> int | None:
        """Prompt tokens with the model's chat template (None when the engine cannot say)."""
        encode = getattr(self.generator, "encode", None)
        if encode is None:
            return None
        return len(encode([messages], GenerationConfig())[0])

    async def complete(self, messages: Chat, sampling: Sampling) -> Completion:
        """Queue the request and wait for its answer."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Completion] = loop.create_future()
        self._queue.put(_Pending(messages, generation_config(sampling), fut, loop))
        return await fut

    async def stream(self, messages: Chat, sampling: Sampling) -> AsyncIterator[str]:
        """The finished answer in pieces of ``STREAM_CHUNK_CHARS`` characters."""
        done = await self.complete(messages, sampling)
        for i in range(0, len(done.text), STREAM_CHUNK_CHARS):
            yield done.text[i : i + STREAM_CHUNK_CHARS]

    async def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self._queue.put(None)
        await asyncio.to_thread(self._worker.join, 30)

    # -- worker ---------------------------------------------------------------------------------------------
    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            groups: dict[str, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.config.model_dump_json(), []).append(p)
            for group in groups.values():
                self._decode(group)

    def _decode(self, group: list[_Pending]) -> None:
        self.batches.append(len(group))
        if self.on_batch is not None:
            self.on_batch(len(group))
        try:
            gens = self.generator.generate([p.messages for p in group], group[0].config, progress=False)
        except Exception as err:  # one failed call fails its requests, not the server
            failure = BackendError(f"generation failed: {type(err).__name__}: {err}")
            for p in group:
                p.loop.call_soon_threadsafe(_set_exception, p.future, failure)
            return
        for p, g in zip(group, gens, strict=True):
            result = Completion(
                text=g.text,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                finish_reason="length" if g.finish_reason == "length" else "stop",
            )
            p.loop.call_soon_threadsafe(_set_result, p.future, result)


def _set_result(fut: asyncio.Future[Completion], value: Completion) -> None:
    if not fut.done():  # the client may have gone (cancelled)
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Completion], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
