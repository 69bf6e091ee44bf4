"""Where tunesec keeps its cache (converted models, judge caches): ``$TUNESEC_HOME`` or ``~/.cache/tunesec``."""

from __future__ import annotations

import os
from pathlib import Path


def tunesec_home() -> Path:
    """The cache root; created on first use."""
    root = Path(os.environ.get("TUNESEC_HOME") or Path.home() / ".cache" / "tunesec").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
