"""tunesec serve in front of an upstream OpenAI-compatible server: chat, streaming, retries, a dead upstream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from serve_helpers import ScriptedBackend, WordJudge, free_port, make_config, make_state, serving
from tunesec.serve.backend import BackendError, Sampling
from tunesec.serve.upstream import UpstreamBackend

pytestmark = pytest.mark.timeout(120)
MSG = [{"role": "user", "content": "hello"}]


def test_guarded_front_over_an_upstream_server(tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "front").mkdir()
    up_cfg = make_config(tmp_path / "up", "guards: {output: {enabled: false}}\n")
    answers = {"hello": "Hello from upstream, a long friendly answer.", "evil": "Sure: BAD steps one two three."}
    upstream = ScriptedBackend(lambda m: answers[m[-1]["content"]], piece=5)
    with serving(make_state(up_cfg, upstream, name="up-model", open_auth=True)) as up_url:
        front_cfg = make_config(tmp_path / "front", "guards: {stream_window_chars: 8}\n")
        from tunesec.serve.auth import KeyStore

        _, key = KeyStore(front_cfg.auth.keys_file).add("k")
        backend = UpstreamBackend(up_url, "up-model", timeout_s=10, retries=1)
        with serving(make_state(front_cfg, backend, name="front", output_judge=WordJudge("BAD"))) as url:
            c = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            out = c.chat.completions.create(model="front", messages=MSG)
            assert out.choices[0].message.content == answers["hello"]
            text = "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(model="front", messages=MSG, stream=True)
                if ch.choices
            )
            assert text == answers["hello"]
            chunks = list(
                c.chat.completions.create(model="front", messages=[{"role": "user", "content": "evil"}], stream=True)
            )
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert "BAD" not in text and chunks[-1].choices[0].finish_reason == "content_filter"
        asyncio.run(backend.close())


def test_upstream_retries_then_fails_cleanly(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        body = json.loads(request.content)
        assert body["model"] == "m" and body["max_tokens"] == 5
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})

    async def go() -> None:
        b = UpstreamBackend("http://up/v1", "m", retries=2, transport=httpx.MockTransport(flaky))
        done = await b.complete(MSG, Sampling(max_tokens=5, temperature=0))
        assert done.text == "ok" and calls["n"] == 2
        await b.close()
        bad = UpstreamBackend(
            "http://up/v1", "m", retries=0, transport=httpx.MockTransport(lambda r: httpx.Response(400))
        )
        with pytest.raises(BackendError, match="HTTP 400"):
            await bad.complete(MSG, Sampling(max_tokens=5, temperature=0))
        await bad.close()

    asyncio.run(go())
    # a dead upstream: the client gets a 502 in OpenAI's shape, the front stays up
    cfg = make_config(tmp_path, "guards: {output: {enabled: false}}\n")
    dead = UpstreamBackend(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=2, retries=1)
    with serving(make_state(cfg, dead, open_auth=True)) as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="m", messages=MSG)
        assert err.value.status_code == 502
        assert httpx.get(url.removesuffix("/v1") + "/healthz").status_code == 200
    asyncio.run(dead.close())
