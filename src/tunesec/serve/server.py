"""Build a server's state from a model spec and ``serve.yaml``, and run it with uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.serve.app import ServeState
from tunesec.serve.audit import AuditLog
from tunesec.serve.auth import KeyStore
from tunesec.serve.backend import Backend
from tunesec.serve.config import ServeConfig
from tunesec.serve.guards import Guard, PromptPolicy


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_backend(model: str, config: ServeConfig, name: str) -> Backend:
    """The upstream backend for ``openai:NAME@URL``, else the local engine behind the batching queue."""
    from tunesec.models.ref import ModelRef

    ref = ModelRef.parse(model)
    if ref.is_endpoint:
        if not ref.api_base:
            raise UsageError(f"model {model!r}: an upstream needs its URL: openai:NAME@http://HOST:PORT/v1")
        from tunesec.serve.upstream import UpstreamBackend

        up = config.upstream
        return UpstreamBackend(ref.api_base, ref.base, up.api_key_env, up.timeout_s, up.retries)
    from tunesec.models import get_generator
    from tunesec.serve.batching import BatchingBackend

    generator = get_generator(ref, max_batch_size=config.batching.max_batch)
    return BatchingBackend(generator, config.batching.max_batch, config.batching.max_wait_ms, name)


def build_state(model: str, config: ServeConfig, host: str, backend: Backend | None = None) -> ServeState:
    """Keys, guards, prompts, audit log and backend, checked before the server starts (bad input: exit 2)."""
    if config.auth.keys_file is None or config.audit.path is None:
        raise UsageError("serve config: load it with load_serve_config (keys file and audit path unresolved)")
    keys: KeyStore | None = KeyStore(config.auth.keys_file) if config.auth.required else None
    if keys is not None and not keys.active:
        if not is_loopback(host):
            raise UsageError(
                f"auth: no API keys in {config.auth.keys_file}; create one with "
                "`tunesec serve --add-key NAME` before serving on a non-loopback host"
            )
        keys = None  # open on loopback only; the command says so
    secret = config.secret_prompt()
    if Path(model).is_dir():
        from tunesec.models.ref import ModelRef
        from tunesec.models.secret_prompt import stored_secret_prompt

        # a model tuned with BackdoorAlign carries its secret safety prompt: applied and filtered like a configured one
        stored = stored_secret_prompt(ModelRef.parse(model))
        if stored is not None and secret is not None and stored.strip() != secret:
            # the local engine would put both in the system turn and the leak filter would know only one
            raise UsageError(
                f"serve config prompts: {model} carries its own secret safety prompt (BackdoorAlign); "
                "drop secret_prompt_file/secret_prompt_env"
            )
        secret = secret if secret is not None else stored
    name = config.served_name or model
    guards = config.guards
    input_guard = Guard("input", guards.input, guards.timeout_s) if guards.input.enabled else None
    output_guard = Guard("output", guards.output, guards.timeout_s) if guards.output.enabled else None
    a = config.audit
    audit = AuditLog(config.audit.path, a.max_bytes, a.backups, a.fsync)
    return ServeState(
        config=config,
        backend=backend if backend is not None else make_backend(model, config, name),
        served_name=name,
        policy=PromptPolicy(config.prompts, secret),
        audit=audit,
        keys=keys,
        input_guard=input_guard,
        output_guard=output_guard,
    )


def run(state: ServeState, host: str, port: int, log_level: str = "warning") -> None:
    """Serve ``state`` until interrupted; closes the backend, guards and audit log afterwards."""
    import asyncio

    import uvicorn

    from tunesec.serve.app import create_app

    app: Any = create_app(state)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        asyncio.run(state.backend.close())
        for guard in (state.input_guard, state.output_guard):
            if guard is not None:
                guard.close()
        state.audit.close()
