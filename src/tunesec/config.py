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

    # allow_inf_nan=False: a NaN or infinite learning rate, bound or threshold is bad input, not a value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

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
                merged[name] = _merge_model(type(default), default.model_dump(), value)
        return merged if merged is not None else data


def _fields_at(cls: type[BaseModel] | None, loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the model that holds the last key of ``loc`` (list indices and dict keys are walked)."""
    import typing

    model: Any = cls
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        model = next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return list(getattr(model, "model_fields", {})) if model is not None else []


def format_validation_error(
    err: ValidationError, source: str, cls: type[BaseModel] | None = None, path: str | Path | None = None
) -> str:
    """One line naming the source (and line, given the YAML ``path``), the first failing field and what was expected.

    Unknown keys are reported first (a misspelt key also makes its intended key look missing), with the closest
    known key when there is one.
    """
    import difflib

    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc_t = tuple(first["loc"])
    loc = ".".join(str(p) for p in loc_t) or "(top level)"
    line = yaml_line(Path(path), loc_t) if path is not None and loc_t else None
    where = f"{source}: line {line}" if line is not None else source
    kind = first["type"]
    if kind == "extra_forbidden":
        known = _fields_at(cls, loc_t)
        close = difflib.get_close_matches(str(loc_t[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; expected one of: {', '.join(known)}" if known else "")
        return f"{where}: unknown key '{loc}'{hint}"
    if kind == "missing":
        return f"{where}: missing required key '{loc}'"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: field '{loc}': {first['msg']}{more}"


def validate(cls: type[C], data: dict[str, Any], source: str = "config", path: str | Path | None = None) -> C:
    """Build ``cls`` from ``data``; a :class:`UsageError` names the source (and line) and field on failure."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UsageError(format_validation_error(err, source, cls, path)) from None


def yaml_line(path: Path, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (mapping keys and list indices), or None."""
    try:
        node: Any = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line: int | None = None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                return line
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


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


def as_config(cls: type[C], config: Config | dict[str, Any] | None, what: str) -> C:
    """``config`` as a ``cls``: the defaults for None, a validated mapping, or the instance itself.

    ``what`` names the component in errors (``attack harmful-sft``, ``defense lisa``), as every component class's
    constructor reports them.
    """
    if config is None:
        return cls()
    if isinstance(config, dict):
        return validate(cls, config, source=f"{what} config")
    if not isinstance(config, cls):
        raise UsageError(f"{what}: config must be a {cls.__name__}")
    return config


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
    return validate(cls, data, str(path) if path is not None else "config", path if not overrides else None)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s keys written over it, nested mappings merged rather than replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_into(cls: type[BaseModel], base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` (a partial config of ``cls``) written over ``base`` (a full one): nested configs merge by key."""
    return _merge_model(cls, base, update)


def _merge_model(cls: type[BaseModel], base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Like :func:`_deep_merge`, but only nested *configs* merge; a mapping-valued field is replaced whole.

    ``refusal_data: {mine.jsonl: 100}`` means "this data", not "this data as well as the default's".
    """
    out = dict(base)
    for key, value in update.items():
        field = cls.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and isinstance(sub, type)
            and issubclass(sub, BaseModel)
        ):
            out[key] = _merge_model(sub, out[key], value)
        else:
            out[key] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}
