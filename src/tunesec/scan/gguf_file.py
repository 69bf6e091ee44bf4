"""GGUF header and tensor extents (the `gguf` package's reader, the one llama.cpp's Python tools use).

Checked: magic and version; that the reader can parse the key-value section and the tensor infos; each tensor's
data inside the file, aligned, and not overlapping another; unreferenced gaps and trailing bytes; the block
count the header claims against the ``blk.N`` tensors present. The chat template(s) and the provenance fields
(name, licence, base models) are returned for the template check and the report.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesec.scan.findings import Finding

GGUF_MAGIC = b"GGUF"
PROVENANCE_PREFIXES = (
    "general.name",
    "general.basename",
    "general.organization",
    "general.finetune",
    "general.license",
    "general.url",
    "general.source",
    "general.base_model",
    "general.repo_url",
    "general.author",
    "general.version",
    "general.description",
)
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class GGUFInfo:
    """What the scan read from a GGUF file."""

    findings: list[Finding] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    control_tokens: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    tensors: int = 0


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic."""
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType sizes
_STRING, _ARRAY = 8, 9
MAX_ARRAY = 4_000_000  # elements in one metadata array (a 256k vocabulary has 256k); the reader loops per element
MAX_DIMS = 4  # GGML_MAX_DIMS


def prewalk(path: Path) -> str | None:
    """What is wrong with the header's counts and lengths, or None; run before the ``gguf`` reader.

    The reader trusts every count: a string length past the end of the file is cut silently, and an array of
    2**62 elements makes it loop for ever. Here each count is bounded by the bytes left before it is used.
    """
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size, pos = len(data), 8

        def take(fmt: str) -> int:
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise ValueError(f"field at byte {pos} runs past the end of the file ({size} bytes)")
            (value,) = struct.unpack_from(fmt, data, pos)
            pos += n
            return int(value)

        def string(what: str) -> None:
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise ValueError(f"{what} at byte {pos - 8} claims {n} bytes, past the end of the file ({size} bytes)")
            pos += n

        def value(vtype: int, depth: int = 0) -> None:
            nonlocal pos
            if vtype in _SCALAR_BYTES:
                take({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR_BYTES[vtype]])
            elif vtype == _STRING:
                string("string")
            elif vtype == _ARRAY and depth < 2:
                etype, count = take("<I"), take("<Q")
                if count > MAX_ARRAY:
                    raise ValueError(f"array at byte {pos - 12} claims {count} elements (limit {MAX_ARRAY})")
                if etype in _SCALAR_BYTES:
                    if pos + count * _SCALAR_BYTES[etype] > size:
                        raise ValueError(f"array at byte {pos - 12} of {count} elements runs past the end of the file")
                    pos += count * _SCALAR_BYTES[etype]
                else:
                    for _ in range(count):
                        value(etype, depth + 1)
            else:
                raise ValueError(f"unknown value type {vtype} at byte {pos - 4}")

        try:
            n_tensors, n_kv = take("<Q"), take("<Q")
            if n_kv > size // 13 or n_tensors > size // 24:  # the smallest key-value pair / tensor info
                return f"{n_kv} key-value pairs and {n_tensors} tensors cannot fit in {size} bytes"
            for _ in range(n_kv):
                string("key")
                value(take("<I"))
            for _ in range(n_tensors):
                string("tensor name")
                dims = take("<I")
                if dims > MAX_DIMS:
                    return f"tensor info at byte {pos - 4} has {dims} dimensions (at most {MAX_DIMS})"
                for _ in range(dims):
                    take("<Q")
                take("<I")  # ggml type
                take("<Q")  # data offset
        except ValueError as err:
            return str(err)
    return None


def _value(reader_field: Any) -> Any:
    try:
        return reader_field.contents()
    except (ValueError, IndexError, TypeError, UnicodeDecodeError):
        return None


def read_gguf(path: Path, rel: str) -> GGUFInfo:
    """Check a GGUF file's header and tensor extents; collect its templates and provenance."""
    info = GGUFInfo()

    def add(severity: str, reason: str, **detail: Any) -> None:
        info.findings.append(Finding("gguf", severity, rel, reason, detail))

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        add("high", "not a GGUF file (bad magic bytes or shorter than the 24-byte header)")
        return info
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        add("high", f"unsupported GGUF version {version} (expected 2 or 3)")
        return info
    problem = prewalk(path)
    if problem is not None:
        add("high", f"malformed GGUF header: {problem}; not parsed further")
        return info
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001  any parser failure on hostile bytes is a finding, not a crash
        add("high", f"corrupt or truncated GGUF header ({type(err).__name__}: {str(err)[:200]})")
        return info
    fields = reader.fields
    info.architecture = _value(fields["general.architecture"]) if "general.architecture" in fields else None
    for key, f in fields.items():
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            value = _value(f)
            if isinstance(value, str):
                info.templates[key] = value
        elif key.startswith(PROVENANCE_PREFIXES):
            value = _value(f)
            if isinstance(value, str | int | float | list):
                info.provenance[key] = value
    _special_tokens(fields, info)
    _extents(reader, size, add)
    info.tensors = len(reader.tensors)
    arch = info.architecture
    blocks = _value(fields[f"{arch}.block_count"]) if arch and f"{arch}.block_count" in fields else None
    seen = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK.match(t.name))}
    if isinstance(blocks, int) and seen:
        if max(seen) >= blocks:
            add(
                "high",
                f"tensors for block {max(seen)} but the header claims {blocks} blocks: weights the "
                "architecture does not use",
                claimed=blocks,
                present=max(seen) + 1,
            )
        missing = sorted(set(range(blocks)) - seen)
        if missing:
            add("medium", f"no tensors for blocks {missing[:5]} of the {blocks} the header claims")
    return info


def _special_tokens(fields: Any, info: GGUFInfo) -> None:
    if "tokenizer.ggml.tokens" not in fields:
        return
    tokens = _value(fields["tokenizer.ggml.tokens"])
    if not isinstance(tokens, list):
        return
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        idx = _value(fields[key]) if key in fields else None
        if isinstance(idx, int) and 0 <= idx < len(tokens):
            info.tokens[{"unknown": "unk", "padding": "pad"}.get(name, name)] = str(tokens[idx])
    types = _value(fields["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in fields else None
    if isinstance(types, list):
        control = 3  # gguf.TokenType.CONTROL
        info.control_tokens = [str(t) for t, ty in zip(tokens, types, strict=False) if ty == control][:2000]


def _extents(reader: Any, size: int, add: Any) -> None:
    align = int(getattr(reader, "alignment", 32) or 32)
    spans = []
    names: set[str] = set()
    for t in reader.tensors:
        start, n = int(t.data_offset), int(t.n_bytes)
        if t.name in names:
            add("high", f"duplicate tensor name {t.name!r}")
        names.add(t.name)
        if start + n > size:
            add("high", f"tensor {t.name!r} ends at byte {start + n}, the file has {size}: truncated")
        if start % align:
            add("medium", f"tensor {t.name!r} at offset {start} is not aligned to {align}")
        spans.append((start, start + n, t.name))
    spans.sort()
    cursor, last = (spans[0][0] if spans else 0), ""
    for start, end, name in spans:
        if start < cursor:
            add("high", f"tensor {name!r} overlaps {last!r}: two names for the same bytes")
        elif start - cursor >= align:
            add("medium", f"{start - cursor} unreferenced bytes before tensor {name!r} (alignment is {align})")
        if end > cursor:
            cursor, last = end, name
    if spans and size - cursor >= align:
        add("medium", f"{size - cursor} trailing bytes after the last tensor: data no tensor claims")
