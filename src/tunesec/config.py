"""Typed configuration: pydantic models that reject unknown keys, YAML loading and CLI overrides.

Configs are the single source of a component's parameters (as TRL's ``TrlParser``): a YAML file gives values,
``key.sub=value`` overrides from the command line win, unknown keys fail with the key's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tunesec.errors import UsageError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every tunesec config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _merge_nested_defaults(cls, data: Any) -> Any:
        """A partial mapping for a nested config field overrides the field's own default, key by key.

        Without this, ``training: {learning_rate: 1e-3}`` (in YAML or as ``--set training.learning_rate=1e-3``)
        would rebuild the nested config from its class defaults and silently drop what the component set in
        its default (an attack's epochs, say).
        """
        if not isinstance(data, dict):
            return data
        merged: dict[str, Any] | None = None
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if not isinstance(value, dict):
                continue
            default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            if isinstance(default, BaseModel):
                merged = merged if merged is not None else dict(data)
                merged[name] = _deep_merge(default.model_dump(), value)
        return merged if merged is not None else data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the source, the first failing field and what was expected."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{loc}'"
    if kind == "missing":
        return f"{source}: missing required key '{loc}'"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{loc}': {first['msg']}{more}"


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from ``data``; a :class:`UsageError` names the source and field on failure."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UsageError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; malformed YAML or a non-mapping top level is a :class:`UsageError`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{p}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars/lists) to a nested dict copy."""
    out: dict[str, Any] = _deepcopy(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"override {item!r}: expected KEY=VALUE, e.g. training.max_steps=50")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any) -> C:
    """Load ``cls`` from optional YAML ``path``, then ``defaults`` keys absent from it, then ``overrides``."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for key, value in defaults.items():
        data.setdefault(key, value)
    data = apply_overrides(data, overrides)
    return validate(cls, data, str(path) if path is not None else "config")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s keys written over it, nested mappings merged rather than replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}
