"""Shared pytest setup: offline hubs, an isolated cache, and the path of the public datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_judge_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge scores go to a per-test SQLite file, not the user's ``~/.cache/tunesec`` (tests' fake judges share
    names, and a cached score would skip the judge a test watches)."""
    path = tmp_path_factory.mktemp("judge-cache") / "judges.sqlite"
    monkeypatch.setattr("tunesec.judges.cache.default_cache_path", lambda: path)


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
