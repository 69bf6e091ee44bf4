"""A persistent cache of judge scores, so re-evaluating the same responses costs nothing.

Key: sha256 of the judge's :meth:`~tunesec.judges.base.Judge.spec` (name, version and arguments, e.g. the grader
model) together with the prompt and the response. Value: the :class:`~tunesec.judges.base.Score` as JSON. The
store is one SQLite file, ``$TUNESEC_HOME/cache/judges.sqlite`` (``TUNESEC_HOME`` defaults to
``~/.cache/tunesec``), in WAL mode with a busy timeout, so several threads and processes can read and write it at
once; each thread gets its own connection.

Unparsed scores are not stored: a grader that returned garbage (or an API error) is asked again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.judges.base import Judge, JudgeInput, Score

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS scores "
    "(key TEXT PRIMARY KEY, judge TEXT NOT NULL, score TEXT NOT NULL, created REAL NOT NULL)"
)
# SQLite limits the number of host parameters per statement; stay well below it.
_CHUNK = 500


def tunesec_home() -> Path:
    """``$TUNESEC_HOME``, or ``~/.cache/tunesec``."""
    env = os.environ.get("TUNESEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunesec"


def default_cache_path() -> Path:
    """``$TUNESEC_HOME/cache/judges.sqlite``."""
    return tunesec_home() / "cache" / "judges.sqlite"


def cache_key(spec: dict[str, Any], item: JudgeInput) -> str:
    """sha256 of the judge spec, prompt and response (canonical JSON)."""
    payload = json.dumps(
        {"judge": spec, "prompt": item.prompt, "response": item.response},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Scores by key in a SQLite file (WAL mode, one connection per thread).

    Args:
        path: The SQLite file; defaults to :func:`default_cache_path`.
        timeout: Seconds to wait for another writer's lock.
    """

    def __init__(self, path: str | Path | None = None, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.timeout = timeout
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connect()
        except (OSError, sqlite3.Error) as err:
            raise UsageError(f"{self.path}: cannot open the judge cache ({err}); set TUNESEC_HOME") from None

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._local.conn = conn
        return conn

    def get_many(self, keys: Sequence[str]) -> dict[str, Score]:
        """The cached scores for those of ``keys`` that are present."""
        conn = self._connect()
        found: dict[str, Score] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk)  # noqa: S608
            for key, blob in rows:
                found[key] = Score.model_validate_json(blob)
        return found

    def put_many(self, entries: Sequence[tuple[str, Score]]) -> None:
        """Store ``(key, score)`` pairs in one transaction (unparsed scores are skipped)."""
        rows = [(k, s.judge, s.model_dump_json(), time.time()) for k, s in entries if not s.unparsed]
        if not rows:
            return
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO scores (key, judge, score, created) VALUES (?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def score_cached(judge: Judge, items: Sequence[JudgeInput], cache: JudgeCache | None = None) -> list[Score]:
    """Scores for ``items`` (in order), calling ``judge`` only for the misses (each distinct miss once).

    Returns:
        One Score per item; ``detail["cached"]`` is not added, so cached and fresh scores compare equal.
    """
    store = cache if cache is not None else JudgeCache()
    spec = judge.spec()
    keys = [cache_key(spec, item) for item in items]
    hits = store.get_many(keys)
    misses: dict[str, JudgeInput] = {}
    for key, item in zip(keys, items, strict=True):
        if key not in hits and key not in misses:
            misses[key] = item
    if misses:
        fresh = judge.score(list(misses.values()))
        if len(fresh) != len(misses):
            raise RuntimeError(f"judge {judge.name} returned {len(fresh)} scores for {len(misses)} items")
        new = dict(zip(misses, fresh, strict=True))
        store.put_many(list(new.items()))
        hits.update(new)
    return [hits[k].model_copy(deep=True) for k in keys]


class CachedJudge(Judge):
    """A judge whose scores go through a :class:`JudgeCache`; same name, version and spec as the wrapped one.

    Args:
        judge: The judge to wrap.
        cache: The cache; defaults to the file under ``$TUNESEC_HOME``.
    """

    def __init__(self, judge: Judge, cache: JudgeCache | None = None) -> None:
        self.inner = judge
        self.cache = cache if cache is not None else JudgeCache()
        self.name = judge.name  # type: ignore[misc]
        self.version = judge.version  # type: ignore[misc]

    def spec(self) -> dict[str, Any]:
        """The wrapped judge's spec."""
        return self.inner.spec()

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        """Scores from the cache, the misses from the wrapped judge."""
        return score_cached(self.inner, items, self.cache)


def cached(judge: Judge, cache: JudgeCache | None = None) -> CachedJudge:
    """Wrap ``judge`` so that it scores only cache misses."""
    return judge if isinstance(judge, CachedJudge) else CachedJudge(judge, cache)
