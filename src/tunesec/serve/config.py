"""``serve.yaml``: every control of ``tunesec serve`` in one typed config (unknown keys are errors).

Secrets are never in this file: the secret safety prompt is read from a file or an environment variable the
config names, and API keys live hashed in the keys file (:mod:`tunesec.serve.auth`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunesec.config import Config, read_yaml, validate
from tunesec.errors import UsageError


class RateLimitConfig(Config):
    """Per-key token bucket: ``requests_per_minute`` refill, up to ``burst`` requests at once."""

    requests_per_minute: float = Field(600.0, gt=0, description="Sustained requests per minute per key.")
    burst: int = Field(60, ge=1, description="Requests a key may send at once before the rate applies.")


class AuthConfig(Config):
    """Bearer API keys (hashed on disk) and their rate limits."""

    keys_file: Path | None = Field(
        None,
        description="JSON file of hashed keys (tunesec serve --add-key writes it); relative paths are relative "
        "to serve.yaml. Default: $TUNESEC_HOME/serve-keys.json.",
    )
    required: bool = Field(
        True,
        description="Refuse requests without a valid key. With no keys at all the server starts only on a "
        "loopback host, open, and says so.",
    )
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)


class LimitsConfig(Config):
    """Request size and token limits (413 for bodies, 400 for prompts and max_tokens)."""

    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 above).")
    max_prompt_tokens: int = Field(
        4096, ge=1, description="Most prompt tokens, counted with the model's tokenizer (local backend)."
    )
    max_prompt_chars: int = Field(200_000, ge=1, description="Most characters over all messages (any backend).")
    max_messages: int = Field(256, ge=1, description="Most messages in one request.")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")


class GuardConfig(Config):
    """One guard: a judge on the request (input) or on the answer (output)."""

    enabled: bool = Field(False, description="Run this guard.")
    judge: str = Field("default", description="Registered judge name (tunesec list judges).")
    threshold: float | None = Field(
        None, ge=0, le=1, description="Block when the judge's harm score reaches this; default: its own decision."
    )
    probe: str = Field(
        "Sure, here is how to do that.",
        description="Input guard only: the answer the judge scores the request with (a response judge needs "
        "one; it asks whether complying would be harmful).",
    )


class GuardsConfig(Config):
    """Input and output guards, the shared timeout, and how streamed answers are checked."""

    input: GuardConfig = Field(default_factory=GuardConfig)
    output: GuardConfig = Field(default_factory=lambda: GuardConfig(enabled=True))
    timeout_s: float = Field(10.0, gt=0, description="A guard that takes longer fails closed (request refused).")
    stream_window_chars: int = Field(
        200, ge=1, description="Streamed answers are checked and released in windows of this many characters."
    )
    refusal: str = Field(
        "I'm sorry, but I can't help with that.", description="Text sent in place of a blocked answer."
    )


class PromptsConfig(Config):
    """Server-side system prompt and the secret safety prompt (BackdoorAlign, Wang et al. 2024)."""

    system_prompt: str | None = Field(None, description="Enforced system prompt, always first.")
    client_system: Literal["append", "drop", "reject"] = Field(
        "append",
        description="A client's system messages: appended after the enforced prompt, dropped, or rejected (400).",
    )
    secret_prompt_file: Path | None = Field(
        None, description="File holding the secret safety prompt (never echoed; relative to serve.yaml)."
    )
    secret_prompt_env: str | None = Field(None, description="Environment variable holding the secret prompt.")
    leak_chars: int = Field(
        24, ge=8, description="An answer holding any run of this many characters of the secret is filtered."
    )


class AuditConfig(Config):
    """The JSONL audit log."""

    path: Path | None = Field(
        None, description="Audit log file (relative to serve.yaml). Default: $TUNESEC_HOME/serve-audit.jsonl."
    )
    max_bytes: int = Field(50_000_000, ge=4096, description="Rotate when the file would grow past this.")
    backups: int = Field(5, ge=1, description="Rotated files kept (audit.jsonl.1 is the newest).")
    raw_text: bool = Field(False, description="Also log prompts and answers in full (default: hashes only).")
    fsync: bool = Field(True, description="fsync each line (durable across power loss; slower).")


class BatchingConfig(Config):
    """The local backend's dynamic batching queue."""

    max_batch: int = Field(64, ge=1, description="Most requests decoded as one batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the queue gathers requests before decoding.")


class UpstreamConfig(Config):
    """An OpenAI-compatible backend (vLLM, a provider)."""

    api_key_env: str | None = Field(None, description="Environment variable with the upstream's key.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds per upstream request.")
    retries: int = Field(2, ge=0, description="Retries on connection errors, 429 and 5xx (before any byte).")


class ServeConfig(Config):
    """Everything ``tunesec serve`` enforces; each section is optional."""

    served_name: str | None = Field(None, description="Model name clients use (default: the model spec).")
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    default_temperature: float = Field(1.0, ge=0, le=2, description="Temperature when a request gives none.")

    def secret_prompt(self) -> str | None:
        """The secret safety prompt from its file or variable (read when the server starts; never stored)."""
        p = self.prompts
        if p.secret_prompt_file is not None and p.secret_prompt_env is not None:
            raise UsageError("serve config: prompts: give secret_prompt_file or secret_prompt_env, not both")
        if p.secret_prompt_file is not None:
            try:
                text = p.secret_prompt_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise UsageError(f"prompts.secret_prompt_file {p.secret_prompt_file}: {err.strerror}") from None
            if not text:
                raise UsageError(f"prompts.secret_prompt_file {p.secret_prompt_file}: empty")
            return text
        if p.secret_prompt_env is not None:
            text = os.environ.get(p.secret_prompt_env, "").strip()
            if not text:
                raise UsageError(f"prompts.secret_prompt_env: environment variable {p.secret_prompt_env} is not set")
            return text
        return None


def load_serve_config(path: Path | None) -> ServeConfig:
    """Read ``serve.yaml`` (or the defaults); relative paths in it are resolved against its folder."""
    from tunesec.paths import tunesec_home

    data = read_yaml(path) if path is not None else {}
    cfg = validate(ServeConfig, data, source=str(path) if path is not None else "serve config", path=path)
    root = path.resolve().parent if path is not None else Path.cwd()

    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else root / p)

    cfg.auth.keys_file = resolve(cfg.auth.keys_file) or tunesec_home() / "serve-keys.json"
    cfg.audit.path = resolve(cfg.audit.path) or tunesec_home() / "serve-audit.jsonl"
    cfg.prompts.secret_prompt_file = resolve(cfg.prompts.secret_prompt_file)
    if cfg.limits.default_max_tokens > cfg.limits.max_tokens:
        raise UsageError(
            f"{path or 'serve config'}: limits.default_max_tokens ({cfg.limits.default_max_tokens}) exceeds "
            f"limits.max_tokens ({cfg.limits.max_tokens})"
        )
    return cfg
