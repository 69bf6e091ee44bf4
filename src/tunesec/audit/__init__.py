"""Data audit of a fine-tuning set, before training.

Finds harmful rows, triggers, identity shift, templates, encodings, duplicates and PII, says why, and keeps
the clean rows.

``audit(path)`` (:mod:`tunesec.audit.runner`) streams the rows through the registered detectors
(:mod:`tunesec.audit.detectors`, registry kind ``detector``) under a policy (:mod:`tunesec.audit.policy`) and
writes ``audit.json`` and ``report.html`` (:mod:`tunesec.audit.report`). docs/AUDIT.md has the measurements.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AuditResult", "audit"]


def __getattr__(name: str) -> Any:
    # the runner imports the data loaders; keep `import tunesec.audit` cheap
    if name in __all__:
        from tunesec.audit import runner

        return getattr(runner, name)
    raise AttributeError(name)
