"""Read raw records from csv, tsv, json, jsonl and parquet files, saved ``datasets`` directories or the hub.

The reading half of :mod:`tunesec.data.loaders`: records come back as :class:`Record` (the raw object plus its
row index and location, ``line 7`` or ``item 3``) so that every later error can name the file and the line.
Bad input raises :class:`~tunesec.errors.UsageError` with one line naming the file and what was expected.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tunesec.errors import UsageError

FileFormat = Literal["csv", "tsv", "json", "jsonl", "parquet", "hf"]

FILE_FORMATS: tuple[str, ...] = ("csv", "tsv", "json", "jsonl", "parquet", "hf")

_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}

_csv_limit_raised = False


class Record:
    """One raw record and where it came from (for error messages and ids)."""

    __slots__ = ("data", "index", "where")

    def __init__(self, data: Any, index: int, where: str) -> None:
        self.data = data
        self.index = index
        self.where = where


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------------- reading
def detect_format(source: str | Path) -> str:
    """The file format of ``source``: from the extension, ``"hf"`` for a directory or a hub id.

    Raises:
        UsageError: the path does not exist and does not look like a hub id, or the extension is unknown.
    """
    path = Path(source)
    if path.is_dir():
        return "hf"
    ext = path.suffix.lower()
    if path.is_file():
        if ext in _EXTENSIONS:
            return _EXTENSIONS[ext]
        raise UsageError(
            f"{path}: unknown file extension {ext or '(none)'!r}; expected one of "
            f"{', '.join(sorted(_EXTENSIONS))} or pass format= ({', '.join(FILE_FORMATS)})"
        )
    if ext in _EXTENSIONS or str(source).startswith((".", "/", "~")):
        raise UsageError(f"{source}: no such file")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)):
        return "hf"
    raise UsageError(f"{source}: no such file or directory, and not a hub dataset id (owner/name)")


def read_records(
    source: str | Path,
    *,
    format: str | None = None,
    split: str | None = None,
    config: str | None = None,
    column_names: Sequence[str] | None = None,
) -> tuple[str, list[Record]]:
    """Read raw records (dicts, or lists for json chats) from a file, a saved dataset or the hub.

    Args:
        source: File path, a directory (``save_to_disk`` output or a dataset folder) or a hub id.
        format: One of ``csv, tsv, json, jsonl, parquet, hf``; detected from ``source`` when None.
        split: Split of a ``datasets`` source; when None, the only split or ``"train"``.
        config: Configuration (``name``) of a hub dataset, e.g. ``"main"`` for ``openai/gsm8k``.
        column_names: Column names of a csv/tsv file without a header row.

    Returns:
        The display name used in error messages and the records.

    Raises:
        UsageError: missing or empty file, broken json/jsonl/csv, unknown format, unreachable hub dataset.
    """
    fmt = format or detect_format(source)
    if fmt not in FILE_FORMATS:
        raise UsageError(f"{source}: unknown format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")
    if fmt == "hf":
        return _read_hf(str(source), split=split, config=config)
    path = Path(source)
    name = str(path)
    if not path.is_file():
        raise UsageError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise UsageError(f"{name}: empty file; expected {fmt} records")
    if fmt in ("csv", "tsv"):
        records = _read_csv(path, delimiter="," if fmt == "csv" else "\t", column_names=column_names)
    elif fmt == "jsonl":
        records = _read_jsonl(path)
    elif fmt == "json":
        records = _read_json(path)
    else:
        records = _read_parquet(path)
    if not records:
        raise UsageError(f"{name}: no records; expected at least one {fmt} record")
    return name, records


def _read_csv(path: Path, *, delimiter: str, column_names: Sequence[str] | None) -> list[Record]:
    global _csv_limit_raised
    if not _csv_limit_raised:
        # Long context strings (HarmBench contextual behaviours) exceed the 128 KiB default field limit.
        csv.field_size_limit(1 << 30)
        _csv_limit_raised = True
    records: list[Record] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, fieldnames=list(column_names) if column_names else None, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if not header:
                raise UsageError(f"{path}: no header row; expected column names on line 1")
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise UsageError(
                        f"{path} line {line}: {len(header) + len(row[None])} fields but the header has "
                        f"{len(header)} ({', '.join(header)})"
                    )
                if any(v is None for v in row.values()):
                    raise UsageError(
                        f"{path} line {line}: fewer fields than the header's {len(header)} ({', '.join(header)})"
                    )
                records.append(Record(dict(row), len(records), f"line {line}"))
        except csv.Error as exc:
            raise UsageError(f"{path} line {reader.line_num}: malformed {path.suffix[1:]} ({exc})") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path} line {lineno}: invalid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise UsageError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
                records.append(Record(obj, len(records), f"line {lineno}"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        hint = "; for one object per line use a .jsonl file" if "Extra data" in str(exc) else ""
        raise UsageError(f"{path}: invalid JSON ({exc}){hint}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if isinstance(obj, dict):
        # {"data": [...]} wrappers, and safety-tuned-llamas' {"instructions": [...], "inputs": [...]}.
        lists = [k for k in ("data", "examples", "rows", "instructions", "prompts") if isinstance(obj.get(k), list)]
        if not lists:
            raise UsageError(
                f"{path}: expected a JSON list of objects (or an object with a 'data' list); "
                f"found an object with keys {', '.join(map(str, obj)) or '(none)'}"
            )
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise UsageError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    records = []
    for i, item in enumerate(obj):
        if isinstance(item, str):
            item = {"prompt": item}
        elif isinstance(item, list):
            item = {"messages": item}  # a list of chats, each a list of messages (Llama-2 AOA train.json)
        elif not isinstance(item, dict):
            raise UsageError(f"{path} item {i}: expected an object, got {type(item).__name__}")
        records.append(Record(item, i, f"item {i}"))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise UsageError(f"{path}: not a readable parquet file ({_one_line(exc)})") from None
    return [Record(r, i, f"row {i}") for i, r in enumerate(rows)]


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _read_hf(source: str, *, split: str | None, config: str | None) -> tuple[str, list[Record]]:
    import datasets

    path = Path(source)
    label = source if config is None else f"{source} ({config})"
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded: Any = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(source, name=config)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        if not path.exists() and _hub_offline():
            raise UsageError(
                f"{label}: not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); "
                "pass a local file or directory instead"
            ) from None
        raise UsageError(f"{label}: cannot load with datasets ({_one_line(exc)[:300]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            if len(names) == 1:
                split = names[0]
            elif "train" in names:
                split = "train"
            else:
                raise UsageError(f"{label}: several splits ({', '.join(names)}); pass split=")
        if split not in loaded:
            raise UsageError(f"{label}: no split {split!r}; expected one of {', '.join(names)}")
        ds = loaded[split]
        label = f"{label}[{split}]"
    else:
        ds = loaded
    rows = [dict(r) for r in ds]
    if not rows:
        raise UsageError(f"{label}: no records")
    return label, [Record(r, i, f"row {i}") for i, r in enumerate(rows)]
