"""Run directories: ``run.json`` first, an append-only ``records.jsonl``, atomic outputs, resume after a kill.

Layout (DESIGN.md)::

    runs/<UTC stamp>-<name>/  run.json · records.jsonl · metrics.json · model/ · report.html · plots/

A run never overwrites another: a fresh run gets a fresh directory, ``--out`` must be new or empty, and a
finished run cannot be resumed into. ``--resume DIR`` keeps every record that was fully written before the kill
(a torn last line is dropped) and the caller skips the ids it already has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunesec.errors import RunConflictError, UsageError
from tunesec.store.atomic import atomic_write_json
from tunesec.store.provenance import git_revision, package_versions

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
METRICS_FILE = "metrics.json"
RUN_FORMAT = 1


def utc_stamp() -> str:
    """UTC timestamp for directory names, e.g. ``20261125T213000Z``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunDir:
    """One run's directory. Build it with :meth:`create` or :meth:`resume`."""

    def __init__(self, path: Path, meta: dict[str, Any], *, created: bool = False, made_dir: bool = False) -> None:
        self.path = path
        self.meta = meta
        self._created = created  # by this process (create), not reopened (resume, open)
        self._made_dir = made_dir

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        kind: str,
        name: str,
        spec: dict[str, Any],
        *,
        out: str | Path | None = None,
        root: str | Path = "runs",
    ) -> RunDir:
        """Create a new run directory and write ``run.json`` (the full spec) before anything else.

        Args:
            kind: What the run does (``eval``, ``attack``, ``certify`` ...).
            name: Short name used in the directory name.
            spec: Everything needed to recreate the run: component names and args, seeds, hashes.
            out: Exact directory to use; it must not exist or be empty.
            root: Parent of auto-named directories.
        """
        if out is not None:
            path = Path(out)
            if path.exists() and not path.is_dir():
                raise RunConflictError(f"{path}: exists and is not a directory; choose a new --out")
            if path.is_dir() and any(path.iterdir()):
                if (path / RUN_FILE).is_file():
                    status = cls._read_meta(path).get("status")
                    if status == "finished":
                        raise RunConflictError(f"{path}: holds a finished run; choose a new --out")
                    raise RunConflictError(
                        f"{path}: holds an unfinished run; continue it with --resume {path} or choose a new --out"
                    )
                raise RunConflictError(f"{path}: directory is not empty; choose a new --out")
        else:
            base = Path(root) / f"{utc_stamp()}-{_slug(name)}"
            path, i = base, 1
            while path.exists():
                i += 1
                path = base.with_name(f"{base.name}-{i}")
        made_dir = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": RUN_FORMAT,
            "kind": kind,
            "name": name,
            "status": "running",
            "created": _now(),
            "spec": spec,
            "provenance": {"versions": package_versions(), "git_revision": git_revision()},
        }
        run = cls(path, meta, created=True, made_dir=made_dir)
        run._save_meta()
        return run

    @classmethod
    def resume(cls, path: str | Path, kind: str | None = None, spec: dict[str, Any] | None = None) -> RunDir:
        """Reopen an unfinished run. A finished run, or a spec that differs, is a :class:`UsageError`."""
        p = Path(path)
        if not (p / RUN_FILE).is_file():
            raise UsageError(f"{p}: not a tunesec run directory (no {RUN_FILE})")
        meta = cls._read_meta(p)
        if meta.get("status") == "finished":
            raise RunConflictError(f"{p}: run already finished; nothing to resume")
        if kind is not None and meta.get("kind") != kind:
            raise UsageError(f"{p}: is a '{meta.get('kind')}' run, cannot resume it as '{kind}'")
        if spec is not None and _canonical(meta.get("spec")) != _canonical(spec):
            diff = sorted(
                k
                for k in set(spec) | set(meta.get("spec", {}))
                if _canonical(spec.get(k)) != _canonical(meta.get("spec", {}).get(k))
            )
            raise UsageError(f"{p}: run spec differs in {', '.join(diff)}; resume with the same arguments")
        run = cls(p, meta)
        run._repair_records()
        meta.setdefault("resumed", []).append(_now())
        run._save_meta()
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open any run directory read-only (for reports and comparisons)."""
        p = Path(path)
        if not (p / RUN_FILE).is_file():
            raise UsageError(f"{p}: not a tunesec run directory (no {RUN_FILE})")
        return cls(p, cls._read_meta(p))

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """The run's spec as written in run.json."""
        return dict(self.meta.get("spec", {}))

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` has been called."""
        return self.meta.get("status") == "finished"

    @property
    def records_path(self) -> Path:
        """Path of ``records.jsonl``."""
        return self.path / RECORDS_FILE

    def update_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into run.json (atomically)."""
        self.meta.update(fields)
        self._save_meta()

    def append(self, record: dict[str, Any]) -> None:
        """Append one finished record; it is on disk when this returns."""
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append finished records in one write and one fsync."""
        if not records:
            return
        if self.finished:
            raise RunConflictError(f"{self.path}: run already finished; records are final")
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        with open(self.records_path, "a", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> Iterator[dict[str, Any]]:
        """The records written so far, skipping a torn final line."""
        if not self.records_path.exists():
            return
        with open(self.records_path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                yield json.loads(line)

    def done_ids(self, key: str = "id") -> set[str]:
        """Ids of records already written (for resume)."""
        return {str(r[key]) for r in self.records() if key in r}

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write ``obj`` as JSON into the run directory."""
        return atomic_write_json(self.path / name, obj)

    def finish(self, metrics: dict[str, Any] | None = None, **fields: Any) -> None:
        """Write ``metrics.json`` (if given) and mark the run finished; it can no longer be resumed."""
        if metrics is not None:
            self.write_json(METRICS_FILE, metrics)
        self.meta.update(fields)
        self.meta["status"] = "finished"
        self.meta["finished"] = _now()
        self._save_meta()

    def discard(self) -> bool:
        """Remove a run made by :meth:`create` that stopped before writing anything but ``run.json`` (bad input).

        Such a run holds nothing to resume, and left in place it would block its ``--out`` directory. Anything
        else in the directory (records, checkpoints, a model) keeps the run, and so does a run reopened with
        :meth:`resume` (the user may fix the input and resume it again). A directory the user gave that existed
        (empty) before the run stays. Returns whether the run was removed.
        """
        if not self._created or self.finished or not self.path.is_dir():
            return False
        if any(p.name != RUN_FILE for p in self.path.iterdir()):
            return False
        (self.path / RUN_FILE).unlink(missing_ok=True)
        if self._made_dir:
            self.path.rmdir()
        return True

    # -- internals ------------------------------------------------------------------------------------------
    def _save_meta(self) -> None:
        atomic_write_json(self.path / RUN_FILE, self.meta)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        try:
            data = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{path / RUN_FILE}: unreadable run file ({err})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path / RUN_FILE}: expected a JSON object")
        return data

    def _repair_records(self) -> None:
        """Drop a torn last line left by a kill mid-write, so appends start on a fresh line."""
        p = self.records_path
        if not p.exists():
            return
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            with open(p, "wb") as fh:
                fh.write(keep)
                fh.flush()
                os.fsync(fh.fileno())


def _slug(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_.=" else "-" for c in name.lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:80] or "run"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
