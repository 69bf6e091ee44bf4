"""One typed registry for every kind of tunesec component.

Modelled on inspect_ai's registry: a decorator records a component under ``(kind, name)`` with a one-line
description and metadata, names are unique per kind, and a run log can rebuild a component from its name and
arguments. Third-party packages add components through the entry-point group ``tunesec.plugins``: each entry
point names a module (or a callable) that is imported (or called) once, registering what it defines.

Example:
    >>> @register("judge", "my-judge", description="Flags responses that contain 'sure'.")
    ... class MyJudge: ...
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, TypeVar, get_args

from tunesec.errors import UsageError

Kind = Literal["model", "dataset", "judge", "metric", "attack", "defense", "guard", "task", "detector"]
KINDS: tuple[str, ...] = get_args(Kind)

PLUGIN_GROUP = "tunesec.plugins"

# Modules that define the built-in components of each kind. They are imported on the first lookup of that kind,
# so that importing `tunesec.registry` (and `tunesec --help`) stays cheap; component modules keep heavy imports
# (torch, transformers) inside functions.
BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "model": ("tunesec.models.aliases", "tunesec.models.aligned_alias"),
    "dataset": ("tunesec.data.named",),
    "judge": ("tunesec.judges",),
    "metric": ("tunesec.evals",),
    "task": ("tunesec.evals",),
    "attack": ("tunesec.attacks",),
    "defense": ("tunesec.defenses", "tunesec.defenses.finetune", "tunesec.defenses.post"),
    "guard": ("tunesec.defenses",),
    "detector": ("tunesec.audit.detectors",),
}

_NAME_RE = re.compile(r"^[a-z0-9]+(?:[-.][a-z0-9]+)*$")

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A registered component: what it is, where it lives and how to describe it."""

    kind: str
    name: str
    obj: Any
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        """Import path of the registered object, for run logs."""
        module = getattr(self.obj, "__module__", "?")
        return f"{module}.{getattr(self.obj, '__qualname__', repr(self.obj))}"


class Registry:
    """Components by kind and name. Use the module-level :data:`registry` and :func:`register`."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._loaded_kinds: set[str] = set()
        self._plugins_loaded = False

    def add(self, kind: str, name: str, obj: Any, description: str = "", **metadata: Any) -> Entry:
        """Register ``obj`` as ``kind``/``name``; names are lowercase and hyphenated, unique per kind."""
        if kind not in self._entries:
            raise ValueError(f"unknown registry kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid {kind} name {name!r}: use lowercase letters, digits and hyphens")
        existing = self._entries[kind].get(name)
        if existing is not None and existing.obj is not obj:
            if existing.qualname != Entry(kind, name, obj).qualname:
                raise ValueError(f"{kind} {name!r} is already registered by {existing.qualname}")
        if not description:
            doc = (getattr(obj, "__doc__", None) or "").strip()
            description = doc.splitlines()[0] if doc else ""
        entry = Entry(kind, name, obj, description, dict(metadata))
        self._entries[kind][name] = entry
        return entry

    def load(self, kind: str | None = None) -> None:
        """Import the built-in modules of ``kind`` (all kinds if None) and the entry-point plugins, once."""
        for k in [kind] if kind is not None else list(KINDS):
            if k in self._loaded_kinds or k not in BUILTIN_MODULES:
                continue
            self._loaded_kinds.add(k)
            for module in BUILTIN_MODULES[k]:
                if importlib.util.find_spec(module) is not None:
                    importlib.import_module(module)
        if not self._plugins_loaded:
            self._plugins_loaded = True
            for ep in entry_points(group=PLUGIN_GROUP):
                target = ep.load()
                if callable(target) and not isinstance(target, type):
                    target(self)

    def get(self, kind: str, name: str) -> Entry:
        """The entry for ``kind``/``name``; a :class:`UsageError` lists the known names otherwise."""
        if kind not in self._entries:
            raise UsageError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.load(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._entries[kind])) or "none registered"
            raise UsageError(f"unknown {kind} {name!r}; expected one of: {known}") from None

    def entries(self, kind: str) -> list[Entry]:
        """All entries of one kind, sorted by name."""
        if kind not in self._entries:
            raise UsageError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.load(kind)
        return sorted(self._entries[kind].values(), key=lambda e: e.name)

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        if kind not in self._entries:
            return False
        self.load(kind)
        return name in self._entries.get(kind, {})

    def __iter__(self) -> Iterator[Entry]:
        self.load()
        for kind in KINDS:
            yield from self.entries(kind)


registry = Registry()


def register(kind: Kind, name: str, description: str = "", **metadata: Any) -> Callable[[T], T]:
    """Class or function decorator that registers a component.

    Args:
        kind: One of ``model, dataset, judge, metric, attack, defense, guard, task, detector``.
        name: Unique lowercase hyphenated name within the kind, e.g. ``"harmful-sft"``.
        description: One line for ``tunesec list``; defaults to the first line of the docstring.
        **metadata: Kind-specific facts, e.g. ``stage`` for defenses, ``threat_model`` for attacks.
    """

    def decorator(obj: T) -> T:
        registry.add(kind, name, obj, description, **metadata)
        try:
            obj.registry_name = name  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        return obj

    return decorator


def create(kind: Kind, name: str, /, **kwargs: Any) -> Any:
    """Build the component ``kind``/``name`` with ``kwargs`` (validated by its config when it has one)."""
    return registry.get(kind, name).obj(**kwargs)
