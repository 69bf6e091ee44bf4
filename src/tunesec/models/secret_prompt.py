"""A model's secret safety prompt (BackdoorAlign): stored beside the model, applied at inference, never shown.

BackdoorAlign (Wang et al. 2024) trains a model to refuse under a secret system prompt; the provider then puts
that prompt in front of every request. tunesec keeps the secret in a file outside the model directory (the
fine-tuning service's ``secret/`` folder, mode 0600); the model directory holds only a marker
(:data:`MARKER`) with the file's relative path, no secret. :func:`stored_secret_prompt` reads it for a model ref;
the generation engine and ``tunesec serve`` apply it (:func:`with_secret`), idempotently, so a server that already
put the secret in the system turn does not get it twice. A model directory is untrusted input: its marker may
only name a private file (regular, the user's own, no group/other permissions) in a ``secret/`` folder, at most
64 KiB, so a crafted marker cannot make tunesec read another local file into every prompt. Nothing here logs,
prints or returns the secret except :func:`stored_secret_prompt`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError

MARKER = "tunesec_secret_prompt.json"
# the folder a secret prompt file must be in (the service writes secret/safety_prompt.txt)
SECRET_DIR = "secret"  # noqa: S105 (a folder name, not a password)
MAX_BYTES = 64 * 1024  # a secret prompt is a few hundred tokens; anything bigger is not one
SEPARATOR = "\n\n"  # between the secret and the rest of the system turn (as serve's PromptPolicy joins them)


def model_dir(ref: Any) -> Path | None:
    """The directory that identifies a ref's weights: its adapter, else a local base directory."""
    if getattr(ref, "adapter", None):
        return Path(ref.adapter)
    if getattr(ref, "kind", None) == "hf" and Path(ref.base).is_dir():
        return Path(ref.base)
    return None


def write_secret(path: Path, secret: str) -> None:
    """Write the secret to ``path`` readable by the owner only (atomically; never overwrites)."""
    if path.exists():
        raise UsageError(f"{path}: a secret prompt is already stored there")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_secret(path: Path) -> str:
    """The secret in ``path`` (a usage error naming the file, never its content, when unreadable or empty)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UsageError(f"{path}: secret prompt file larger than {MAX_BYTES} bytes; expected a short prompt")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: secret prompt file is not UTF-8 text") from None
    except OSError as err:
        raise UsageError(f"{path}: secret prompt file unreadable ({err.strerror})") from None
    if not text.strip():
        raise UsageError(f"{path}: secret prompt file is empty")
    return text


def link_secret(target_model_dir: Path, secret_path: Path) -> None:
    """Write the marker in a model directory that points at the secret file (by relative path)."""
    from tunesec.store.atomic import atomic_write_json

    rel = os.path.relpath(secret_path.resolve(), target_model_dir.resolve())
    atomic_write_json(target_model_dir / MARKER, {"secret_prompt_file": rel, "applied_as": "system-prefix"})


def secret_path_for(ref: Any) -> Path | None:
    """The secret file a model's marker points at, or None when the model has none."""
    d = model_dir(ref)
    if d is None or not (d / MARKER).is_file():
        return None
    try:
        rel = json.loads((d / MARKER).read_text(encoding="utf-8"))["secret_prompt_file"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{d / MARKER}: malformed secret-prompt marker (expected secret_prompt_file)") from None
    path = (d / str(rel)).resolve()
    # A model directory may come from anyone: its marker must not make tunesec read an arbitrary file into every
    # prompt. Only a private file (regular, the user's own, mode 0600 as write_secret makes it) in a secret/ folder.
    try:
        st = path.stat()
    except OSError:
        raise UsageError(f"{d / MARKER}: the secret prompt file it names does not exist") from None
    own = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    if path.parent.name != SECRET_DIR or not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or not own:
        raise UsageError(
            f"{d / MARKER}: expected it to name a private file (mode 0600, yours) in a {SECRET_DIR}/ folder"
        )
    return path


def stored_secret_prompt(ref: Any) -> str | None:
    """The secret safety prompt stored with ``ref``'s model, or None."""
    path = secret_path_for(ref)
    return read_secret(path) if path is not None else None


def with_secret(chat: list[dict[str, str]], secret: str | None) -> list[dict[str, str]]:
    """``chat`` with ``secret`` first in its system turn (added when there is none); unchanged if already there."""
    if not secret:
        return chat
    if chat and chat[0].get("role") == "system":
        content = chat[0].get("content", "")
        if content.startswith(secret):
            return chat
        return [{**chat[0], "content": secret + SEPARATOR + content if content else secret}, *chat[1:]]
    return [{"role": "system", "content": secret}, *chat]
