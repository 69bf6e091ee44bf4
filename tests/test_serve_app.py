"""tunesec serve with the official openai client: chat, streaming, models, errors, batching, a short load test."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from serve_helpers import ScriptedBackend, audit_lines, make_config, make_state, serving
from tunesec.serve.auth import KeyStore

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory):
    from tiny import save_tiny
    from tunesec.models import get_generator

    return get_generator(str(save_tiny(tmp_path_factory.mktemp("serve-tiny") / "model")), backend="hf")


def _client(url: str, key: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60, **kw)


def test_local_engine_chat_stream_and_models_match_the_engine(tiny_engine, tmp_path: Path) -> None:
    from tunesec.models.types import GenerationConfig
    from tunesec.serve.batching import BatchingBackend

    cfg = make_config(tmp_path, "guards: {output: {enabled: false}}\n")
    _, key = KeyStore(cfg.auth.keys_file).add("tester")
    backend = BatchingBackend(tiny_engine, max_batch=8, max_wait_ms=5, name="tiny")
    state = make_state(cfg, backend, name="tiny")
    prompt = "Write a poem about the sea."
    want = tiny_engine.generate([prompt], GenerationConfig(max_new_tokens=12), progress=False)[0].text
    assert want  # the tiny model says something, so equality below is a real check
    with serving(state) as url:
        client = _client(url, key)
        assert [m.id for m in client.models.list()] == ["tiny"]
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
        )
        assert out.choices[0].message.content == want
        assert out.usage is not None and out.usage.completion_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert len(chunks) > 3  # streamed in pieces, not one blob
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'tunesec_requests_total{status="200"} 2.0' in metrics
        assert "tunesec_queue_depth" in metrics
        assert httpx.get(url.removesuffix("/v1") + "/healthz").json()["status"] == "ok"
    lines = audit_lines(cfg.audit.path)
    assert len(lines) == 2 and {ln["key_id"] for ln in lines} != {None}
    assert all(ln["prompt_sha256"].startswith("sha256:") and "prompt" not in ln for ln in lines)
    assert key not in cfg.audit.path.read_text()
    asyncio_close(backend)


def asyncio_close(backend) -> None:
    import asyncio

    asyncio.run(backend.close())


def test_errors_are_openai_shaped_and_the_server_stays_up(tiny_engine, tmp_path: Path) -> None:
    from tunesec.serve.batching import BatchingBackend

    cfg = make_config(
        tmp_path,
        "guards: {output: {enabled: false}}\n"
        "limits: {max_body_bytes: 200000, max_tokens: 64, default_max_tokens: 16, max_prompt_tokens: 256}\n",
    )
    store = KeyStore(cfg.auth.keys_file)
    kept, key = store.add("good")
    revoked, old = store.add("old")
    store.revoke(revoked.id)
    backend = BatchingBackend(tiny_engine, max_batch=8, max_wait_ms=2, name="tiny")
    state = make_state(cfg, backend, name="tiny")
    msg = [{"role": "user", "content": "hi"}]
    with serving(state) as url:
        for bad_key in ("", "tsk-wrong", old):
            with pytest.raises(openai.AuthenticationError) as err:
                _client(url, bad_key or "x").chat.completions.create(model="tiny", messages=msg)
            assert err.value.status_code == 401
        r = httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": msg})  # no header at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = _client(url, key)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="gpt-4o", messages=msg)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny", messages=msg, max_tokens=10_000)
        with pytest.raises(openai.BadRequestError, match="context_length_exceeded|tokens exceeds"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 20_000}])
        with pytest.raises(openai.BadRequestError, match="n"):
            client.chat.completions.create(model="tiny", messages=msg, n=2)
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        cases = [
            (b"{not json", 400, "invalid_json"),
            (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, None),
            (json.dumps({"model": "tiny", "messages": msg, "max_tokens": "many"}).encode(), 400, None),
            (json.dumps({"model": "tiny", "messages": msg, "frobnicate": 1}).encode(), 400, None),
            (json.dumps([1, 2]).encode(), 400, None),
            (b"x" * 10_000_000, 413, "body_too_large"),
        ]
        for body, status, code in cases:
            r = httpx.post(url + "/chat/completions", content=body, headers=auth, timeout=60)
            assert r.status_code == status, (body[:40], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if code:
                assert err["code"] == code
        assert "frobnicate" in httpx.post(url + "/chat/completions", content=cases[3][0], headers=auth).text
        r = httpx.get(url.removesuffix("/v1") + "/nope")
        assert r.status_code == 404 and "error" in r.json()
        ok = client.chat.completions.create(model="tiny", messages=msg, max_tokens=4)  # still serving
        assert ok.choices[0].message.content is not None
    text = cfg.audit.path.read_text()
    assert key not in text and old not in text and "tsk-wrong" not in text
    statuses = [ln["status"] for ln in audit_lines(cfg.audit.path)]
    assert statuses.count(401) == 4 and statuses.count(413) == 1 and statuses[-1] == 200
    asyncio_close(backend)


def test_rate_limit_answers_429(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "auth: {keys_file: keys.json, rate_limit: {requests_per_minute: 1, burst: 2}}\n")
    _, key = KeyStore(cfg.auth.keys_file).add("a")
    _, other = KeyStore(cfg.auth.keys_file).add("b")
    state = make_state(cfg, ScriptedBackend(lambda m: "fine"))
    msg = [{"role": "user", "content": "hi"}]
    with serving(state) as url:
        client = _client(url, key)
        for _ in range(2):
            client.chat.completions.create(model="m", messages=msg)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="m", messages=msg)
        assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) > 0
        _client(url, other).chat.completions.create(model="m", messages=msg)  # limits are per key
    assert [ln["status"] for ln in audit_lines(cfg.audit.path)] == [200, 200, 429, 200]


def test_dynamic_batching_under_concurrent_clients(tiny_engine, tmp_path: Path) -> None:
    """The shortened load test: concurrent clients, no errors, one audit line per request, batches > 1."""
    from tunesec.serve.batching import BatchingBackend

    cfg = make_config(tmp_path, "guards: {output: {enabled: false}}\n")
    _, key = KeyStore(cfg.auth.keys_file).add("load")
    backend = BatchingBackend(tiny_engine, max_batch=32, max_wait_ms=20, name="tiny")
    state = make_state(cfg, backend, name="tiny")
    clients, per_client = 16, 3
    errors: list[BaseException] = []
    answers: list[str] = []
    with serving(state) as url:
        client = _client(url, key, http_client=httpx.Client(limits=httpx.Limits(max_connections=clients)))
        barrier = threading.Barrier(clients)

        def work(k: int) -> None:
            barrier.wait()
            for j in range(per_client):
                try:
                    out = client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"Question {k} {j}?"}], max_tokens=8,
                        temperature=0,
                    )  # fmt: skip
                    answers.append(out.choices[0].message.content or "")
                except Exception as err:  # collected and asserted below
                    errors.append(err)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert len(answers) == clients * per_client
    lines = audit_lines(cfg.audit.path)
    assert len(lines) == clients * per_client and len({ln["id"] for ln in lines}) == len(lines)
    assert max(backend.batches) > 1 and sum(backend.batches) == clients * per_client
    asyncio_close(backend)


def test_eval_runs_against_the_served_model(tiny_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tunesec eval openai:NAME@URL` certifies what is served: the model with its controls."""
    from tunesec.cli.main import main
    from tunesec.serve.batching import BatchingBackend

    cfg = make_config(tmp_path, "guards: {output: {enabled: false}}\n")
    _, key = KeyStore(cfg.auth.keys_file).add("eval")
    backend = BatchingBackend(tiny_engine, max_batch=8, max_wait_ms=5, name="tiny")
    state = make_state(cfg, backend, name="tiny")
    monkeypatch.setenv("OPENAI_API_KEY", key)
    out = tmp_path / "run"
    with serving(state) as url:
        code = main(["eval", f"openai:tiny@{url}", "--task", "harmfulness", "--dataset", "advbench", "--limit", "3",
                     "--judge", "refusal-keywords", "--max-new-tokens", "8", "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert len(audit_lines(cfg.audit.path)) == 3  # each answer went through the server
    assert key not in (out / "run.json").read_text()
    asyncio_close(backend)
