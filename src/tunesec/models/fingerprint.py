"""Content hashes of a model's weights, for run specs and certificates, in a form ``sha256sum`` reproduces.

For a model file (``.gguf``), or a directory's weight files (``*.safetensors``, ``*.gguf``, ``*.bin``, ``*.pt``,
``*.pth``) and config files (``config.json``, ``adapter_config.json``, ``generation_config.json``) directly in
it, tunesec records (the same in eval runs, attack provenance, ``models info --hashes`` and certificates):

- ``files``: each file's name and plain sha256, exactly what ``sha256sum FILE`` prints;
- ``sha256``: one digest over them, the sha256 of ``sha256sum``'s own listing of those files in name order, i.e.
  ``cd DIR && LC_ALL=C sha256sum $(LC_ALL=C ls *.safetensors ...) | sha256sum`` (lines ``<hex>  <name>``).
  For a single file the listing has one line.

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
# Files that change what the weights compute: hashed with them (an adapter's scaling lives in adapter_config.json).
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")


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


def weight_files(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{file name: sha256}`` of a model file, or of the weight and config files directly in a directory.

    Empty when there is no weight file.
    """
    p = Path(path)
    if p.is_file():
        return {p.name: file_sha256(p)}
    if not p.is_dir():
        return {}
    found = [
        f for f in sorted(p.iterdir()) if f.is_file() and (f.name.endswith(WEIGHT_SUFFIXES) or f.name in CONFIG_FILES)
    ]
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in found):
        return {}
    return {f.name: file_sha256(f) for f in found}


def listing_sha256(files: dict[str, str]) -> str:
    """sha256 of the ``sha256sum`` listing of ``files`` in byte order of their names (see the module docstring)."""
    import hashlib

    text = "".join(f"{files[name]}  {name}\n" for name in sorted(files, key=lambda n: n.encode()))
    return hashlib.sha256(text.encode()).hexdigest()


def weight_hashes(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{"files": {name: sha256}, "sha256": listing digest}`` of a model's weights; None if it has none."""
    files = weight_files(path)
    if not files:
        return None
    return {"files": files, "sha256": listing_sha256(files)}


def weights_sha256(path: str | os.PathLike[str]) -> str | None:
    """The listing digest of a model's weight files (see the module docstring); None if absent."""
    hashes = weight_hashes(path)
    return None if hashes is None else str(hashes["sha256"])


def fingerprint(ref: ModelRef) -> dict[str, Any]:
    """The ref's spec plus the hashes of its base weights and adapter (resolving aliases; module docstring)."""
    from tunesec.models.loading import resolve_alias

    out: dict[str, Any] = {"ref": ref.spec()}
    if ref.is_endpoint:
        return out
    concrete = resolve_alias(ref)
    if concrete is not ref:
        out["resolved"] = concrete.spec()
    base = weight_hashes(concrete.base)
    if base is not None:
        out["weights_sha256"] = base["sha256"]
        out["weights_files"] = base["files"]
    if concrete.adapter:
        adapter = weight_hashes(concrete.adapter)
        out["adapter_sha256"] = None if adapter is None else adapter["sha256"]
        out["adapter_files"] = None if adapter is None else adapter["files"]
    return out
