"""The audit policy: which detectors run, with what settings, and how many findings fail the audit.

A YAML file (``--policy``) validated by pydantic; unknown keys and unknown detector names are errors naming the
file and the key. Example::

    strict: false            # skip malformed rows (counted) instead of failing on the first one
    detectors:
      harmful: {judge: default, max_share: 0.0}
      duplicates: {max_share: 0.01}       # up to 1% duplicate rows pass
      pii: {enabled: false}

Every detector has ``enabled``, ``max_share`` (the share of rows it may flag before the audit exits 1; default
0: any finding fails) and ``filter`` (``--filter`` removes its rows); the rest are the detector's own settings
(``tunesec list detectors``; docs/AUDIT.md lists them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesec.audit.base import DetectorConfig
from tunesec.config import Config, read_yaml, validate
from tunesec.errors import UsageError


class AuditPolicy(Config):
    """The audit's settings (see the module docstring)."""

    name: str = Field("default", description="Policy name, for the report.")
    strict: bool = Field(False, description="Fail on the first malformed row instead of skipping it.")
    chunk_size: int = Field(256, ge=1, description="Rows read and judged together.")
    max_examples: int = Field(5, ge=0, description="Example rows per detector in report.html.")
    detectors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-detector settings by name; detectors not named use their defaults."
    )


def detector_names() -> list[str]:
    """Registered detector names."""
    from tunesec.registry import registry

    return [e.name for e in registry.entries("detector")]


def load_audit_policy(path: str | Path | None = None) -> tuple[AuditPolicy, dict[str, DetectorConfig]]:
    """The policy and every registered detector's validated config.

    Raises:
        UsageError: a missing or malformed file, an unknown key, an unknown detector or a bad value: one line
            naming the file and the field.
    """
    from tunesec.registry import registry

    source = str(path) if path is not None else "default audit policy"
    data = read_yaml(path) if path is not None else {}
    policy = validate(AuditPolicy, data, source, path)
    known = detector_names()
    for name, settings in policy.detectors.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(known)}"
            raise UsageError(f"{source}: unknown detector '{name}' in 'detectors'{hint}")
        if not isinstance(settings, dict):
            raise UsageError(f"{source}: field 'detectors.{name}': expected a mapping of settings, got {settings!r}")
    configs: dict[str, DetectorConfig] = {}
    for name in known:
        cls = registry.get("detector", name).obj
        configs[name] = validate(cls.config_class, policy.detectors.get(name, {}), f"{source}: detectors.{name}")
    return policy, configs
