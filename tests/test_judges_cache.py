from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from tunesec.judges import Judge, JudgeCache, JudgeInput, Score, cached, score_cached
from tunesec.judges.cache import cache_key, default_cache_path


class CountingJudge(Judge):
    """Flags responses containing 'bad'; counts the items it was asked to score."""

    name = "counting"
    version = "1"

    def __init__(self, word: str = "bad", unparsed: bool = False) -> None:
        self.word = word
        self.unparsed = unparsed
        self.seen: list[str] = []

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "word": self.word}

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        self.seen.extend(i.response for i in items)
        if self.unparsed:
            return [Score(judge=self.name, unparsed=True) for _ in items]
        return [Score(judge=self.name, harmful=self.word in i.response, detail={"n": len(i.response)}) for i in items]


def _items(*responses: str) -> list[JudgeInput]:
    return [JudgeInput(prompt="p", response=r) for r in responses]


def test_default_path_follows_tunesec_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    # conftest points the cache at a per-test file; this test checks the real default
    monkeypatch.setattr("tunesec.judges.cache.default_cache_path", default_cache_path)
    assert default_cache_path() == tmp_path / "home" / "cache" / "judges.sqlite"
    JudgeCache()
    assert (tmp_path / "home" / "cache" / "judges.sqlite").is_file()


def test_only_misses_are_scored_and_order_is_kept(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "c.sqlite")
    judge = CountingJudge()
    first = score_cached(judge, _items("good", "bad", "good"), cache)
    assert judge.seen == ["good", "bad"]  # the duplicate is scored once
    assert [s.harmful for s in first] == [False, True, False]
    second = score_cached(judge, _items("bad", "new bad", "good"), cache)
    assert judge.seen == ["good", "bad", "new bad"]
    assert [s.harmful for s in second] == [True, True, False]
    assert second[0] == first[1]
    assert len(cache) == 3


def test_key_depends_on_judge_spec_prompt_and_response(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "c.sqlite")
    a, b = CountingJudge("bad"), CountingJudge("good")
    score_cached(a, _items("good"), cache)
    score_cached(b, _items("good"), cache)  # other args: a miss
    assert b.seen == ["good"]
    item = JudgeInput(prompt="p", response="r")
    assert cache_key(a.spec(), item) != cache_key(a.spec(), JudgeInput(prompt="q", response="r"))
    assert cache_key(a.spec(), item) != cache_key({**a.spec(), "version": "2"}, item)


def test_persists_across_instances_and_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    score_cached(CountingJudge(), _items("bad"), JudgeCache(path))
    judge = CountingJudge()
    wrapped = cached(judge, JudgeCache(path))
    assert wrapped.name == "counting" and wrapped.spec() == judge.spec()
    assert wrapped.score(_items("bad"))[0].harmful is True
    assert judge.seen == []
    assert cached(wrapped) is wrapped
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unparsed_scores_are_not_cached(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "c.sqlite")
    judge = CountingJudge(unparsed=True)
    score_cached(judge, _items("x"), cache)
    score_cached(judge, _items("x"), cache)
    assert judge.seen == ["x", "x"]
    assert len(cache) == 0


def test_concurrent_threads_share_the_file(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "c.sqlite")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            score_cached(CountingJudge(), _items(*[f"bad {k} {i}" for i in range(50)]), cache)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache) == 200
