"""Shared pytest setup: offline hubs, an isolated cache, and the path of the public datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def _judge_cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("judge-cache") / "judges.sqlite"


@pytest.fixture(autouse=True)
def _isolated_judge_cache(_judge_cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge scores go to one SQLite file per test session, not the user's ``~/.cache/tunesec``: a test run
    starts from an empty cache (as on a fresh machine) and leaves the user's cache alone."""
    monkeypatch.setattr("tunesec.judges.cache.default_cache_path", lambda: _judge_cache_path)


@pytest.fixture
def shared_data() -> Path:
    """The read-only public datasets beside the checkout (../shared/data); skips where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama model with a byte-level BPE tokenizer and a ChatML template."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama") / "model", arch="llama")
