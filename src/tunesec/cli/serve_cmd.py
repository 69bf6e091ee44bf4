"""``tunesec serve``: a guarded OpenAI-compatible server (:mod:`tunesec.serve`); also creates and revokes keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesec.errors import UsageError


def serve(
    model: Annotated[
        str | None,
        typer.Argument(help="Model to serve: alias, directory, .gguf, hub id, or openai:NAME@URL (an upstream)."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="serve.yaml with the server's controls.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (keys are required off loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
    add_key: Annotated[
        str | None, typer.Option("--add-key", help="Create an API key with this name, print it once, and exit.")
    ] = None,
    revoke_key: Annotated[
        str | None, typer.Option("--revoke-key", help="Revoke the key with this id and exit.")
    ] = None,
) -> None:
    """Serve a model behind authentication, rate limits, guards, system prompts and an audit log."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"tunesec serve needs {', '.join(missing)}: pip install 'tunesec[serve]'")
    from tunesec.serve.config import load_serve_config

    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    cfg = load_serve_config(config)
    if add_key is not None or revoke_key is not None:
        _manage_keys(cfg.auth.keys_file, add_key, revoke_key, model)
        return
    if model is None:
        raise UsageError("tunesec serve: give a MODEL to serve (or --add-key NAME / --revoke-key ID)")
    from tunesec.cli.common import console
    from tunesec.serve.server import build_state, run

    state = build_state(model, cfg, host)
    url = f"http://{host}:{port}/v1"
    console.print(f"serving [bold]{state.served_name}[/] at {url}  (audit log: {cfg.audit.path})")
    if state.keys is None:
        console.print(
            f"[yellow]no API keys in {cfg.auth.keys_file}: open to any local client; "
            "create one with `tunesec serve --add-key NAME`[/]"
        )
    guards = [n for n, g in (("input", state.input_guard), ("output", state.output_guard)) if g is not None]
    console.print(f"guards: {', '.join(guards) or 'none'}; fail-closed after {cfg.guards.timeout_s:g} s")
    run(state, host, port)


def _manage_keys(keys_file: Path | None, add: str | None, revoke: str | None, model: str | None) -> None:
    from tunesec.serve.auth import KeyStore

    if add is not None and revoke is not None:
        raise UsageError("--add-key and --revoke-key: give one of them")
    if model is not None:
        raise UsageError("--add-key / --revoke-key manage keys and exit; give no MODEL with them")
    assert keys_file is not None
    store = KeyStore(keys_file)
    if add is not None:
        record, key = store.add(add)
        # The key itself goes to stdout once, alone on its line, so it can be piped; it is stored only hashed.
        typer.echo(f"created key {record.id} ({record.name}) in {keys_file}; it is shown only now:", err=True)
        typer.echo(key)
    else:
        assert revoke is not None
        record = store.revoke(revoke)
        typer.echo(f"revoked key {record.id} ({record.name}) in {keys_file}")


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``tunesec`` app."""
    app.command("serve")(serve)
