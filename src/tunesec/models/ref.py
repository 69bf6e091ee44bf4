"""``ModelRef``: what one lifecycle stage hands the next.

A ref names a base model (alias, hub id, local directory, GGUF file or OpenAI-compatible endpoint), an optional
PEFT adapter on top of it, and the provenance of how it was produced. Refs are immutable: a stage that tunes a
model returns a new ref whose ``parent`` is the old one.

Spec strings accepted by :meth:`ModelRef.parse` (and the CLI):

- an alias from the model registry, e.g. ``smollm2-135m``;
- a local directory with ``config.json`` (a Hugging Face model) or ``adapter_config.json`` (a PEFT adapter);
- a ``.gguf`` file;
- a hub id ``org/name`` (optionally ``org/name@revision``);
- ``openai:MODEL`` for an OpenAI-compatible chat endpoint (base URL from ``--api-base`` or ``OPENAI_BASE_URL``,
  key from the environment variable named by ``api_key_env``, default ``OPENAI_API_KEY``); evaluation only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesec.errors import UsageError

SourceKind = Literal["alias", "hf", "gguf", "openai"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelRef(BaseModel):
    """An immutable reference to a model, with provenance.

    Attributes:
        base: Alias name, hub id, local directory, ``.gguf`` path, or endpoint model name.
        kind: How ``base`` is interpreted.
        adapter: Directory of a PEFT adapter applied on top of ``base``.
        revision: Hub revision (branch, tag or commit) for hub ids.
        api_base: Base URL of an OpenAI-compatible endpoint (``kind="openai"``).
        api_key_env: Name of the environment variable that holds the endpoint's key (never the key itself).
        provenance: How this model was produced: component, args, parent ref, hashes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    kind: SourceKind = "hf"
    adapter: str | None = None
    revision: str | None = None
    api_base: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short display name: the base, plus the adapter's folder.

        An adapter in a run directory's ``model/`` is named after the run, e.g. ``smollm2-135m+harmful-sft``
        rather than ``smollm2-135m+model``.
        """
        base = Path(self.base).name if self.kind in ("gguf",) else self.base
        if self.adapter:
            folder = Path(self.adapter)
            if folder.name in ("model", "adapter") and folder.parent.name not in ("", "."):
                folder = folder.parent
            return f"{base}+{folder.name}"
        return base

    @property
    def is_endpoint(self) -> bool:
        """True for black-box API models (no weights: evaluation only)."""
        return self.kind == "openai"

    def with_adapter(self, adapter: str | Path, **provenance: Any) -> ModelRef:
        """A new ref: this base plus ``adapter``, with provenance pointing back to this ref."""
        if self.adapter is not None:
            raise UsageError(f"{self.name}: already has an adapter; merge it before stacking another")
        prov = {**provenance, "parent": self.spec()}
        return self.model_copy(update={"adapter": str(adapter), "provenance": prov})

    def spec(self) -> dict[str, Any]:
        """JSON-able description for run specs (no secrets: only the key's variable name)."""
        return self.model_dump(exclude_defaults=True)

    @classmethod
    def parse(cls, spec: str | ModelRef, *, base: str | None = None) -> ModelRef:
        """Interpret a model spec string (see the module docstring).

        Args:
            spec: The string, or a ref (returned unchanged).
            base: For an adapter directory: the base model spec, overriding the adapter's own record.
        """
        if isinstance(spec, ModelRef):
            return spec
        s = spec.strip()
        if not s:
            raise UsageError("model: empty model name")
        if s.startswith("openai:"):
            name = s.removeprefix("openai:")
            api_base = None
            if "@" in name:
                name, api_base = name.split("@", 1)
            if not name:
                raise UsageError(f"model {spec!r}: expected openai:MODEL_NAME[@BASE_URL]")
            return cls(base=name, kind="openai", api_base=api_base)

        from tunesec.registry import registry

        if ("model", s) in registry:
            return cls(base=s, kind="alias")

        path = Path(s).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UsageError(f"{path}: GGUF file not found")
            return cls(base=str(path.resolve()), kind="gguf")
        if path.is_dir():
            if (path / "adapter_config.json").is_file():
                return cls._adapter_ref(path, base)
            if (path / "config.json").is_file():
                return cls(base=str(path.resolve()), kind="hf")
            raise UsageError(
                f"{path}: not a model directory (expected config.json, or adapter_config.json for an adapter)"
            )
        if path.exists():
            raise UsageError(f"{path}: expected a model directory or a .gguf file")
        looks_local = s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s
        if looks_local:
            raise UsageError(f"{s}: model directory not found")
        hub_id, _, revision = s.partition("@")
        if _HUB_ID.match(hub_id):
            return cls(base=hub_id, kind="hf", revision=revision or None)
        known = ", ".join(e.name for e in registry.entries("model"))
        raise UsageError(
            f"unknown model {s!r}: expected an alias ({known}), a local model directory, a .gguf file, "
            "a hub id org/name, or openai:MODEL"
        )

    @classmethod
    def _adapter_ref(cls, path: Path, base: str | None) -> ModelRef:
        cfg_path = path / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{cfg_path}: unreadable adapter config ({err})") from None
        base_spec = base or cfg.get("base_model_name_or_path")
        if not base_spec:
            raise UsageError(f"{cfg_path}: no base_model_name_or_path; pass the base model with --base")
        base_ref = cls.parse(base_spec)
        if base_ref.adapter is not None:
            raise UsageError(f"{cfg_path}: base {base_spec!r} is itself an adapter; merge it first")
        return base_ref.model_copy(update={"adapter": str(path.resolve())})
