"""safetensors header sanity, checked on the raw bytes.

The format: an 8-byte little-endian header size, a JSON header, then the tensor data
(https://github.com/huggingface/safetensors#format).

The header is parsed here rather than by the ``safetensors`` library because the library stops at the first
problem, and a scan should name every one: offsets that disagree with dtype x shape, tensors that overlap
(two names for the same bytes), gaps and trailing bytes (room for a hidden payload), a header size outside
bounds, duplicate JSON keys (two parsers may disagree on which one wins), unknown dtypes, non-string metadata.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesec.scan.findings import Finding

# bytes per element (the F4/F6 packed types count whole bytes of their packed storage, so are left out)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_METADATA_CHARS = 65_536
STANDARD_METADATA = frozenset({"format", "total_size"})


@dataclass
class TensorEntry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str
    shape: list[int]
    start: int
    end: int


@dataclass
class SafetensorsHeader:
    """What a header declares, plus the findings of its checks."""

    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    header_size: int = 0
    file_size: int = 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(path: Path, rel: str) -> SafetensorsHeader:
    """Parse and check the header of ``path`` (shown as ``rel``); reads only the header bytes."""
    out = SafetensorsHeader(file_size=path.stat().st_size)

    def add(severity: str, reason: str, **detail: Any) -> None:
        out.findings.append(Finding("safetensors", severity, rel, reason, detail))

    size = out.file_size
    if size < 8:
        add("high", f"truncated: {size} bytes, less than the 8-byte header size")
        return out
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        out.header_size = n
        if n < 2 or n > MAX_HEADER:
            add("high", f"header size {n} is outside [2, {MAX_HEADER}]")
            return out
        if 8 + n > size:
            add("high", f"truncated: header claims {n} bytes, file has {size - 8} after the size field")
            return out
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: nesting as a DoS
        add("high", f"header is not valid JSON ({str(err)[:200] or type(err).__name__})")
        return out
    if not isinstance(header, dict):
        add("high", "header is not a JSON object")
        return out
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            add("medium", "__metadata__ is not a mapping of strings to strings (the format requires it)")
        else:
            out.metadata = meta
            chars = sum(len(k) + len(v) for k, v in meta.items())
            if chars > MAX_METADATA_CHARS:
                add("low", f"metadata holds {chars} characters: large enough to carry a payload", keys=sorted(meta))
            unusual = sorted(set(meta) - STANDARD_METADATA)
            if unusual:
                add("info", f"metadata keys beyond format/total_size: {', '.join(unusual)}", keys=unusual)
    data_len = size - 8 - n
    for name, spec in header.items():
        if not isinstance(spec, dict):
            add("high", f"tensor {name!r}: entry is not an object")
            continue
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            add("high", f"tensor {name!r}: shape or data_offsets malformed ({shape!r}, {offsets!r})")
            continue
        start, end = offsets
        out.tensors[name] = TensorEntry(name, str(dtype), shape, start, end)
        if start > end:
            add("high", f"tensor {name!r}: data_offsets start {start} after end {end}")
        if dtype not in DTYPE_BYTES:
            if not str(dtype).startswith(("F4", "F6")):
                add("medium", f"tensor {name!r}: unknown dtype {dtype!r}")
        elif end - start != math.prod(shape) * DTYPE_BYTES[str(dtype)]:
            add(
                "high",
                f"tensor {name!r}: {end - start} bytes between its offsets, but {dtype} x {shape} needs "
                f"{math.prod(shape) * DTYPE_BYTES[str(dtype)]}",
            )
        if end > data_len:
            add("high", f"tensor {name!r} ends at byte {end} of the data, which has {data_len}: truncated file")
    _extents(out, data_len, add)
    return out


def _extents(out: SafetensorsHeader, data_len: int, add: Any) -> None:
    """Overlaps, gaps and trailing bytes of the data section."""
    spans = sorted((t.start, t.end, t.name) for t in out.tensors.values() if t.start <= t.end)
    cursor, last = 0, ""
    overlaps = gaps = 0
    for start, end, name in spans:
        if start < cursor and end > start:
            overlaps += 1
            if overlaps <= 3:
                add(
                    "high",
                    f"tensor {name!r} overlaps {last!r} (bytes {start}-{min(end, cursor)}): two names for "
                    "the same bytes",
                    a=last,
                    b=name,
                )
        elif start > cursor:
            gaps += 1
            if gaps <= 3:
                add(
                    "medium",
                    f"{start - cursor} unreferenced bytes before tensor {name!r} (at {cursor}): room for "
                    "a hidden payload",
                    offset=cursor,
                    length=start - cursor,
                )
        if end >= cursor:
            cursor, last = end, name
    if overlaps > 3 or gaps > 3:
        add("high" if overlaps > 3 else "medium", f"{overlaps} overlaps and {gaps} gaps in all")
    if cursor < data_len and spans:
        add(
            "medium",
            f"{data_len - cursor} trailing bytes after the last tensor: data no tensor claims",
            offset=cursor,
            length=data_len - cursor,
        )
    if not spans and data_len > 0:
        add("medium", f"no tensors but {data_len} bytes of data")
