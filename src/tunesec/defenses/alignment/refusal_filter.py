"""Screen refusal data for benign prompts before it teaches a model to refuse them.

Refusal datasets built from red-teaming prompts hold benign requests that were refused anyway. In
safety-tuned-llamas' ``safety_only_data_Instructions`` (Bianchi et al. 2024), converted from Anthropic red-team
attempts, there are "Name the tallest mountain in the world.", "Calculate the square root of 48.", "Create a plan
for your weekend." and "Research who invented basketball in Germany.", each answered with a refusal. Trained on,
they teach exactly the over-refusal an alignment recipe tries to avoid.

The screen is a nearest-neighbour vote in sentence-embedding space (all-MiniLM-L6-v2, the embedder the judges
use): for each refusal prompt, the mean cosine similarity of its ``k`` nearest benign instructions minus that of
its ``k`` nearest *other* refusal prompts (of all the refusal datasets in the mix). A prompt that sits closer to
ordinary instructions than to the rest of the refusal data (margin above ``max_margin``) is dropped. It needs no
labels and no model beyond the embedder; it is a screen, not a classifier: it catches the obviously benign and
misses benign prompts phrased like the harmful ones, and a few harmful prompts phrased like ordinary instructions
go with the benign ones (measured in docs/RESULTS.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.config import Config


class RefusalFilterConfig(Config):
    """Drop refusal examples whose prompt is nearer to benign instructions than to the other refusal prompts."""

    benign_prompts: str = Field(
        "alpaca:instructions", description="Benign instructions to compare with (dataset name or path)."
    )
    benign_sample: int = Field(6000, ge=10, description="How many of them (a seeded sample) to embed.")
    k: int = Field(5, ge=1, description="Neighbours averaged on each side.")
    max_margin: float = Field(
        0.0, ge=-1.0, le=1.0, description="Prompts whose benign-minus-refusal similarity exceeds this are dropped."
    )
    datasets: list[str] | None = Field(
        None,
        description="Refusal datasets to screen (default: all). A hand-checked set is better left out: the screen "
        "also drops some harmful prompts phrased like ordinary instructions.",
    )


def benign_margins(prompts: Sequence[str], benign: Sequence[str], k: int, embedder: Any = None) -> list[float]:
    """Benign-minus-own similarity margin of each prompt (cosine similarity of sentence embeddings).

    For each of ``prompts``: the mean similarity of its ``k`` nearest ``benign`` texts minus that of its ``k``
    nearest other ``prompts`` (fewer neighbours when a side has fewer than ``k``).
    """
    import numpy as np

    if embedder is None:
        from tunesec.judges.classifier import get_embedder

        embedder = get_embedder()
    k_own = min(k, len(prompts) - 1)
    k_benign = min(k, len(benign))
    if k_own < 1 or k_benign < 1:
        raise ValueError("benign_margins needs at least two prompts and one benign text")
    own = embedder.encode(list(prompts))
    ref = embedder.encode(list(benign))
    to_benign = own @ ref.T
    to_own = own @ own.T
    np.fill_diagonal(to_own, -np.inf)
    near_benign = -np.sort(-to_benign, axis=1)[:, :k_benign].mean(axis=1)
    near_own = -np.sort(-to_own, axis=1)[:, :k_own].mean(axis=1)
    return [float(m) for m in near_benign - near_own]


def benign_prompt_sample(config: RefusalFilterConfig, seed: int) -> list[str]:
    """The seeded sample of benign instructions the screen compares with."""
    from tunesec.attacks.base import load_data

    prompts = sorted({e.prompt for e in load_data(config.benign_prompts)})
    random.Random(f"{seed}:refusal-filter").shuffle(prompts)
    return prompts[: config.benign_sample]
