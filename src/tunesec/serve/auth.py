"""API keys (stored as SHA-256 hashes, never in plain text) and per-key rate limits.

A key is ``tsk-`` + 32 random bytes (URL-safe base64), shown once when created. Keys carry 256 bits of entropy,
so a plain SHA-256 is enough to make the stored hash useless to a thief (no dictionary to try); lookups compare
digests in constant time. The keys file is JSON, rewritten atomically; each key has a public id (``kid-...``)
that the audit log records instead of the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.store.atomic import atomic_write_json

KEY_PREFIX = "tsk-"


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key (what the keys file stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: public id, name, hash, creation time, revoked flag."""

    id: str
    name: str
    sha256: str
    created: str
    revoked: bool = False


class KeyStore:
    """The keys file: create, revoke, and check bearer keys.

    Args:
        path: JSON file ``{"keys": [{id, name, sha256, created, revoked}, ...]}``; absent means no keys.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = self._read()
        self._by_hash = {r.sha256: r for r in self.records}

    def _read(self) -> list[KeyRecord]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            rows = data["keys"]
            return [KeyRecord(**row) for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{self.path}: not a tunesec keys file ({type(err).__name__})") from None

    def _save(self) -> None:
        atomic_write_json(self.path, {"keys": [r.__dict__ for r in self.records]})

    @property
    def active(self) -> list[KeyRecord]:
        """Keys not revoked."""
        return [r for r in self.records if not r.revoked]

    def add(self, name: str) -> tuple[KeyRecord, str]:
        """Create a key named ``name``; returns its record and the key itself (the only time it is known)."""
        if not name.strip():
            raise UsageError("--add-key: give the key a non-empty name")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            id="kid-" + secrets.token_hex(6),
            name=name.strip(),
            sha256=hash_key(key),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.records.append(record)
        self._by_hash[record.sha256] = record
        self._save()
        return record, key

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark the key ``key_id`` revoked (kept in the file, so its id stays meaningful in old audit lines)."""
        for k, r in enumerate(self.records):
            if r.id == key_id:
                self.records[k] = KeyRecord(**{**r.__dict__, "revoked": True})
                self._by_hash[r.sha256] = self.records[k]
                self._save()
                return self.records[k]
        known = ", ".join(r.id for r in self.records) or "none"
        raise UsageError(f"--revoke-key {key_id}: no such key id in {self.path} (known: {known})")

    def check(self, key: str) -> KeyRecord | None:
        """The active record of ``key``, or None (unknown or revoked)."""
        digest = hash_key(key)
        record = self._by_hash.get(digest)
        if record is None or record.revoked or not hmac.compare_digest(record.sha256, digest):
            return None
        return record


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class RateLimiter:
    """Token buckets per key id: ``burst`` requests at once, refilled at ``per_minute`` a minute.

    Args:
        per_minute: Sustained rate.
        burst: Bucket size.
        clock: Time source (tests pass a fake one).
    """

    def __init__(self, per_minute: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key_id: str) -> tuple[bool, float]:
        """Take one token for ``key_id``; returns (allowed, seconds until a token is free)."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return True, 0.0
            self._buckets[key_id] = (tokens, now)
            return False, (1.0 - tokens) / self.rate
