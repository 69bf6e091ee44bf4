"""Stream the rows of a fine-tuning file for the audit, without loading the whole file.

JSONL, CSV and TSV are read line by line and parquet by record batches, so a 1 GB JSONL never sits in memory;
a JSON list and a saved ``datasets`` directory are read whole (a JSON document cannot be parsed in pieces
with the standard library; a saved dataset is memory-mapped by ``datasets``). Each record becomes an
:class:`~tunesec.data.schema.Example` through :func:`tunesec.data.loaders.records_to_examples`, so the audit
accepts exactly what training accepts: OpenAI chat JSONL (system prompts, ``weight``), ShareGPT, Alpaca and
generic prompt/response columns.

A record that cannot be read (broken JSON, bytes that are not UTF-8, a chat without a user turn) is skipped and
counted, with its line in the audit's ``skipped`` list; with ``strict`` it is a :class:`UsageError`. A record
whose schema differs from the first record's (an Alpaca row in a chat file) is always an error: the file has no
one reading.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesec.audit.base import Row
from tunesec.data.loaders import detect_schema, records_to_examples
from tunesec.data.readers import Record, detect_format, read_records
from tunesec.errors import UsageError

MAX_SKIPPED_LISTED = 100


@dataclass
class ReadStats:
    """What reading the file skipped (and why), filled in while rows stream."""

    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)
    schema: str = ""
    format: str = ""

    def skip(self, where: str, strict: bool) -> None:
        """Count one unreadable record; raise instead when ``strict``."""
        if strict:
            raise UsageError(f"{where} (--strict: malformed rows are errors; without it they are skipped)")
        self.skipped += 1
        if len(self.skipped_where) < MAX_SKIPPED_LISTED:
            self.skipped_where.append(where)


def _records(path: Path, fmt: str, stats: ReadStats, strict: bool) -> Iterator[tuple[Record, str]]:
    """Raw records with their raw JSON text (for ``--filter``), one at a time where the format allows."""
    name = str(path)
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    stats.skip(f"{name} line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})", strict)
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    stats.skip(f"{name} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})", strict)
                    continue
                if not isinstance(obj, dict):
                    stats.skip(f"{name} line {lineno}: expected a JSON object, got {type(obj).__name__}", strict)
                    continue
                yield Record(obj, lineno - 1, f"line {lineno}"), line.rstrip("\r\n")
        return
    if fmt in ("csv", "tsv"):
        csv.field_size_limit(1 << 30)
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh, delimiter="," if fmt == "csv" else "\t")
                if not reader.fieldnames:
                    raise UsageError(f"{name}: no header row; expected column names on line 1")
                for i, row in enumerate(reader):
                    where = f"line {reader.line_num}"
                    if None in row or any(v is None for v in row.values()):
                        stats.skip(f"{name} {where}: field count differs from the header's", strict)
                        continue
                    yield Record(dict(row), i, where), json.dumps(row, ensure_ascii=False)
        except UnicodeDecodeError as exc:
            raise UsageError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise UsageError(f"{name}: malformed {fmt} ({exc})") from None
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            i = 0
            for batch in pf.iter_batches(batch_size=1024):
                for obj in batch.to_pylist():
                    yield Record(obj, i, f"row {i}"), json.dumps(obj, ensure_ascii=False, default=str)
                    i += 1
        except UsageError:
            raise
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise UsageError(f"{name}: not a readable parquet file ({' '.join(str(exc).split())[:200]})") from None
        return
    _, records = read_records(path, format=fmt)
    for rec in records:
        yield rec, json.dumps(rec.data, ensure_ascii=False, default=str)


def _row(index: int, where: str, ex: Any) -> Row:
    by_role: dict[str, list[str]] = {"system": [], "user": [], "assistant": []}
    for m in ex.messages:
        by_role[m.role].append(m.content)
    return Row(
        index=index,
        where=where,
        system="\n\n".join(by_role["system"]),
        user="\n\n".join(by_role["user"]),
        assistant="\n\n".join(by_role["assistant"]),
        first_answer=ex.response or "",
    )


def iter_rows(source: str | Path, *, strict: bool = False, stats: ReadStats | None = None) -> Iterator[tuple[Row, str]]:
    """Rows of ``source`` in file order, each with its record as one line of JSON.

    Args:
        source: A csv/tsv/json/jsonl/parquet file or a saved ``datasets`` directory.
        strict: Fail on the first malformed record instead of skipping it.
        stats: Filled with what was skipped and the detected format and schema.

    Raises:
        UsageError: missing or empty file, unknown extension, a record of another schema than the first, no
            readable record at all, and with ``strict`` any malformed record.
    """
    stats = stats if stats is not None else ReadStats()
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{source}: no such file or directory")
    fmt = detect_format(path)
    stats.format = fmt
    if fmt != "hf" and path.stat().st_size == 0:
        raise UsageError(f"{path}: empty file; expected {fmt} records")
    name = str(path)
    schema: str | None = None
    first_where = ""
    index = 0
    for rec, raw in _records(path, fmt, stats, strict):
        sch = detect_schema(rec.data)
        if schema is None:
            schema, first_where = sch, rec.where
            stats.schema = sch
        elif sch != schema:
            keys = ", ".join(map(str, rec.data)) or "(none)"
            raise UsageError(
                f"{name} {rec.where}: a {sch} record ({keys}) in a file whose first record ({first_where}) is "
                f"{schema}; expected one schema per file"
            )
        try:
            ex = records_to_examples([rec], name=name, source_name="audit", schema=schema, id_field="")[0]
        except UsageError as exc:
            stats.skip(str(exc), strict)
            continue
        yield _row(index, rec.where, ex), raw
        index += 1
    if index == 0:
        detail = f" ({stats.skipped} malformed, first: {stats.skipped_where[0]})" if stats.skipped_where else ""
        raise UsageError(f"{name}: no readable rows{detail}")
