"""Judges: score (prompt, response) pairs for refusal and harm.

Importing this package registers every built-in judge (no torch is imported until a judge scores):

- ``refusal-keywords``: refusal phrases (:mod:`tunesec.judges.keywords`);
- ``harm-classifier``: MiniLM embeddings + trained head (:mod:`tunesec.judges.classifier`);
- ``keywords-embedding``: the two combined (:mod:`tunesec.judges.ensemble`), the default before ``response-judge``;
- ``response-judge``: a MiniLM cross-encoder trained on five labelled sources (:mod:`tunesec.judges.cross_encoder`),
  also registered as ``default``;
- ``strongreject-rubric``: the StrongREJECT rubric with an LLM grader (:mod:`tunesec.judges.rubric`);
- ``guard-model``: Llama Guard 3 / WildGuard / HarmBench classifier (:mod:`tunesec.judges.guard`).

Scores can be cached across runs with :func:`cached` / :func:`score_cached` (:mod:`tunesec.judges.cache`).
"""

from __future__ import annotations

from typing import Any

from tunesec.errors import UsageError
from tunesec.judges.base import Judge, JudgeInput, Score
from tunesec.judges.cache import CachedJudge, JudgeCache, cached, score_cached
from tunesec.judges.classifier import HarmClassifier
from tunesec.judges.cross_encoder import DefaultJudge, ResponseJudge
from tunesec.judges.ensemble import KeywordsEmbeddingJudge
from tunesec.judges.guard import GuardModel
from tunesec.judges.keywords import RefusalKeywords
from tunesec.judges.rubric import StrongRejectRubric
from tunesec.registry import registry

__all__ = [
    "CachedJudge",
    "DefaultJudge",
    "KeywordsEmbeddingJudge",
    "ResponseJudge",
    "GuardModel",
    "HarmClassifier",
    "Judge",
    "JudgeCache",
    "JudgeInput",
    "RefusalKeywords",
    "Score",
    "StrongRejectRubric",
    "cached",
    "get_judge",
    "score_cached",
]


def get_judge(name: str, **kwargs: Any) -> Judge:
    """Build the registered judge ``name`` with ``kwargs``.

    Raises:
        UsageError: Unknown judge name, or arguments the judge does not take.
    """
    cls = registry.get("judge", name).obj
    try:
        judge = cls(**kwargs)
    except TypeError as err:
        raise UsageError(f"judge {name}: {err}") from None
    if not isinstance(judge, Judge):
        raise UsageError(f"judge {name}: registered object {cls!r} is not a Judge")
    return judge
