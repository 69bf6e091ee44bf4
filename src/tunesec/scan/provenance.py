"""Provenance: the sha256 of every file (what ``sha256sum`` prints), and licence and card fields when present.

Card fields come from the YAML front matter of ``README.md`` (the Hugging Face model card: ``license``,
``base_model``, ``datasets`` ...), from ``config.json``/``adapter_config.json`` (the base they name) and from a
GGUF file's ``general.*`` keys. These are notes (a missing licence too), never findings, except a card whose front
matter does not parse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesec.scan.findings import Finding

CARD_FIELDS = (
    "license",
    "license_name",
    "license_link",
    "base_model",
    "base_model_relation",
    "datasets",
    "language",
    "library_name",
    "pipeline_tag",
    "tags",
    "model_name",
    "model_creator",
)
CACHED_ABOVE = 16 << 20  # small files hash faster than the cache (one JSON file) is read and rewritten
SHOW_PROGRESS_ABOVE = 256 << 20


def file_hashes(root: Path, files: list[Path], *, progress: bool = False) -> dict[str, dict[str, Any]]:
    """``{relative name: {"sha256", "bytes"}}``; files over 16 MiB go through the weight-hash cache.

    With ``progress``, a bar over the files (shown when they add up to more than 256 MiB).
    """
    from tunesec.models.fingerprint import file_sha256
    from tunesec.progress import make_progress
    from tunesec.store.provenance import sha256_file

    out: dict[str, dict[str, Any]] = {}
    sizes = {f: f.stat().st_size for f in files}
    with make_progress(progress and sum(sizes.values()) > SHOW_PROGRESS_ABOVE) as bar:
        task = bar.add_task("sha256", total=len(files))
        for f in files:
            rel = f.name if root.is_file() else str(f.relative_to(root))
            bar.update(task, info=rel[-40:])
            digest = file_sha256(f) if sizes[f] > CACHED_ABOVE else sha256_file(f)
            out[rel] = {"sha256": digest, "bytes": sizes[f]}
            bar.advance(task)
    return out


def card_fields(readme: Path, rel: str) -> tuple[dict[str, Any], list[Finding]]:
    """The model card's front-matter fields."""
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}, [Finding("provenance", "info", rel, "model card without YAML front matter (no licence field)")]
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError as err:
        return {}, [Finding("provenance", "low", rel, f"model card front matter is not valid YAML ({err})")]
    if not isinstance(meta, dict):
        return {}, []
    fields = {k: meta[k] for k in CARD_FIELDS if k in meta}
    notes = []
    if "license" not in fields:
        notes.append(Finding("provenance", "info", rel, "model card names no licence"))
    return fields, notes


def config_fields(path: Path) -> dict[str, Any]:
    """Base-model and architecture fields of a ``config.json`` or ``adapter_config.json``."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    keys = ("base_model_name_or_path", "_name_or_path", "architectures", "model_type", "peft_type", "revision")
    return {k: cfg[k] for k in keys if cfg.get(k)}
