"""Content hashes of a model's weights, for run specs and certificates.

Hashing a model's safetensors takes about a second per 500 MB, so results are cached in
``$TUNESEC_HOME/hash-cache.json`` keyed by path, size and modification time (a changed file is re-hashed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunesec.models.ref import ModelRef
from tunesec.paths import tunesec_home
from tunesec.store.atomic import atomic_write_json
from tunesec.store.provenance import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def _cache_path() -> Path:
    return tunesec_home() / "hash-cache.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _cache_path()
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache[key] = digest
    try:
        atomic_write_json(cache_file, cache)
    except OSError:
        pass  # a read-only cache only costs a re-hash
    return digest


def weights_sha256(path: str | os.PathLike[str]) -> str | None:
    """One hash over a model file or the weight files of a directory (names and contents); None if absent."""
    import hashlib

    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        return None
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def fingerprint(ref: ModelRef) -> dict[str, Any]:
    """The ref's spec plus the sha256 of its base weights and adapter (resolving aliases)."""
    from tunesec.models.loading import resolve_alias

    out: dict[str, Any] = {"ref": ref.spec()}
    if ref.is_endpoint:
        return out
    concrete = resolve_alias(ref)
    if concrete is not ref:
        out["resolved"] = concrete.spec()
    base_hash = weights_sha256(concrete.base)
    if base_hash is not None:
        out["weights_sha256"] = base_hash
    if concrete.adapter:
        out["adapter_sha256"] = weights_sha256(concrete.adapter)
    return out
