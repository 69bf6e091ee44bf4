"""The audit log: one JSON line per request, appended whole, rotated by size.

Each line is written with a single ``write`` on a file opened in append mode (and fsynced when configured), so
a reader sees whole lines; a line torn by a crash mid-write (power loss) is cut off when the log is reopened,
before the next append. Rotation renames ``audit.jsonl`` to ``audit.jsonl.1`` (older ones shift up, the oldest
beyond ``backups`` is removed) when the next line would pass ``max_bytes``. Keys never appear: lines carry the
key's public id. Prompts and answers appear as SHA-256 hashes unless the config asks for raw text.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def text_hash(text: str) -> str:
    """``sha256:`` + hex digest of UTF-8 ``text``."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def repair_tail(path: Path) -> bool:
    """Cut a torn last line (no trailing newline) off ``path``; returns whether anything was cut."""
    if not path.exists():
        return False
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        # Walk back in blocks to the last newline; keep everything up to and including it.
        pos = size
        keep = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = pos + idx + 1
                break
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return True


class AuditLog:
    """Append-only JSONL audit log with rotation (thread-safe within one process).

    Args:
        path: The log file.
        max_bytes: Rotate before a line would make the file larger than this.
        backups: Rotated files kept.
        fsync: fsync after each line.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, fsync: bool = True) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self.repaired = False
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = repair_tail(path)
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (one ``write`` call)."""
        data = (json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            size = os.fstat(self._fd).st_size
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
            view = memoryview(data)
            while view:  # a regular file takes the whole write; the loop covers a short write all the same
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(self._fd)

    def _rotate(self) -> None:
        os.close(self._fd)
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for k in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{k}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{k + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
