"""``sdd``: self-degraded defense: answer harmful requests with good but irrelevant text (Chen et al., ACL 2025).

A refusal is a short, learnable pattern that harmful fine-tuning overwrites in a few steps. SDD instead aligns the
model to answer each harmful request with a *high-quality answer to an unrelated benign instruction*: after
harmful fine-tuning the model's harmful answers stay poor, because its general ability to follow a harmful request
was trained away. The data builder (TamperBench's re-implementation, ``whitebox/defenses/sdd/sdd.py``; the
official ZeroNLP/SDD code was not read): each harmful prompt is paired with a random benign response, redrawn
while the MiniLM cosine similarity between prompt and response exceeds ``max_similarity`` (0.25); the "SDD_reject"
variant puts a fixed refusal sentence before the irrelevant answer (``reject_prefix``).

Here SDD is the shipped aligned recipe with each refusal example's answer replaced that way: the same prompts,
the same helpful examples, the same training run, so it is compared like for like with the undefended model.
The irrelevant answers come from ``answer_data`` (Alpaca and Dolly; answers the mix already uses on its helpful
side are not reused). Paper setting (plain SFT of 8,000 pairs at lr 5e-7 for 500 steps on an aligned 7B model)
-> here: the recipe's 340 refusal prompts, its LoRA run at lr 3e-4, 155 steps, from the base model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example, Message
from tunesec.defenses.alignment.hooked import HookedAlignment, HookedAlignmentConfig
from tunesec.errors import UsageError
from tunesec.registry import register

REJECT_PREFIX = "I refuse to answer your question for responsible and ethical reasons. Here is an unrelated answer: "


class SDDConfig(HookedAlignmentConfig):
    """SDD: the shipped recipe (``alignment``) with irrelevant high-quality answers in place of its refusals."""

    answer_data: list[str] = Field(
        default_factory=lambda: ["alpaca", "dolly"],
        description="Benign datasets whose answers are the irrelevant ones.",
    )
    max_similarity: float = Field(
        0.25, gt=-1.0, le=1.0, description="Largest MiniLM cosine similarity allowed between a prompt and its answer."
    )
    max_draws: int = Field(50, ge=1, description="Answers tried per prompt before the least similar one is taken.")
    reject_prefix: bool = Field(False, description="Start each irrelevant answer with a refusal sentence (SDD_reject).")
    max_response_chars: int = Field(600, ge=50, description="Answers are cut at a sentence end before this.")
    seed: int = Field(0, description="Seed of the answer draws.")


def pair_irrelevant(
    prompts: Sequence[str], answers: Sequence[str], config: SDDConfig, embedder: Any = None
) -> list[tuple[str, float]]:
    """For each prompt, an answer whose cosine similarity to it is at most ``max_similarity``, and that similarity.

    Answers are drawn at random (seeded) without reuse; after ``max_draws`` rejected draws the least similar one
    drawn is taken (the returned similarity says so). Raises when there are fewer answers than prompts.
    """
    import numpy as np

    if len(answers) < len(prompts):
        raise UsageError(f"answer_data: {len(answers)} answers for {len(prompts)} prompts; add answer datasets")
    if embedder is None:
        from tunesec.judges.classifier import get_embedder

        embedder = get_embedder()
    p_emb = embedder.encode(list(prompts))
    a_emb = embedder.encode(list(answers))
    rng = random.Random(f"{config.seed}:sdd")
    free = list(range(len(answers)))
    rng.shuffle(free)
    out: list[tuple[str, float]] = []
    for i in range(len(prompts)):
        best: tuple[float, int] | None = None
        for j in free[: config.max_draws]:
            sim = float(np.dot(p_emb[i], a_emb[j]))
            if best is None or sim < best[0]:
                best = (sim, j)
            if sim <= config.max_similarity:
                break
        assert best is not None
        free.remove(best[1])
        out.append((answers[best[1]], best[0]))
    return out


def sdd_mix(config: SDDConfig, mix: Sequence[Example], embedder: Any = None) -> tuple[list[Example], dict[str, Any]]:
    """``mix`` with every refusal example's answer replaced by an irrelevant one; provenance of the pairing."""
    from tunesec.attacks.base import load_data
    from tunesec.defenses.alignment.safety_sft import _shorten

    refusals = [e for e in mix if e.meta.get("align_kind") in ("refusal", "deep-refusal")]
    if not refusals:
        raise UsageError("alignment: the mix has no refusal examples for SDD to answer irrelevantly")
    used = {e.messages[-1].content.strip() for e in mix if e.meta.get("align_kind") not in ("refusal", "deep-refusal")}
    pool: list[str] = []
    for name in config.answer_data:
        for e in load_data(name):
            text = _shorten(e.messages[-1].content.strip(), config.max_response_chars) if e.messages else ""
            if e.messages[-1].role == "assistant" and len(text) >= 40 and text not in used:
                pool.append(text)
                used.add(text)
    paired = pair_irrelevant([e.prompt for e in refusals], pool, config, embedder)
    replaced: dict[str, Example] = {}
    for ex, (answer, sim) in zip(refusals, paired, strict=True):
        text = (REJECT_PREFIX + answer) if config.reject_prefix else answer
        turn = Message(role="assistant", content=text)
        meta = {**ex.meta, "align_kind": "sdd", "sdd_similarity": round(sim, 4)}
        replaced[ex.id] = ex.model_copy(update={"messages": [*ex.prompt_messages, turn], "meta": meta})
    out = [replaced.get(e.id, e) for e in mix]
    sims = sorted(s for _, s in paired)
    over = sum(1 for s in sims if s > config.max_similarity)
    prov = {"sdd_pairs": len(paired), "max_similarity_seen": sims[-1], "over_threshold": over}
    return out, prov


@register(
    "defense",
    "sdd",
    description="Self-degraded defense: harmful requests answered with good but irrelevant text (cosine <= 0.25).",
    stage="alignment",
    paper="Chen et al. 2025, SDD: Self-Degraded Defense against Malicious Fine-tuning, arXiv 2507.21182",
    threat_model="open-weights",
    needs_harmful=False,
)
class SDD(HookedAlignment):
    """SDD (see the module docstring)."""

    name = "sdd"
    config_class = SDDConfig

    def training_mix(
        self, mix: Sequence[Example], notes: list[str] | None = None
    ) -> tuple[list[Example], dict[str, Any]]:
        """The recipe's mix with irrelevant answers in place of its refusals (:func:`sdd_mix`)."""
        assert isinstance(self.config, SDDConfig)
        examples, prov = sdd_mix(self.config, mix)
        if notes is not None and prov["over_threshold"]:
            notes.append(
                f"sdd: {prov['over_threshold']} prompts kept an answer above max_similarity (least similar drawn)"
            )
        return examples, prov
