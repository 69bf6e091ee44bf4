"""``safety-sft``: safety alignment by supervised fine-tuning on refusals mixed with helpful answers.

Bianchi et al. 2024 ("Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that
Follow Instructions") show that adding a few hundred refusal demonstrations to instruction data makes a model
refuse harmful requests, and that too many of them (without benign look-alikes) causes over-refusal of safe
prompts that merely sound dangerous. The default mix is therefore balanced: refusals from their
``safety_only_data_Instructions`` (plus tunesec's own refusals) and, in equal number, helpful answers from
Alpaca, Dolly and tunesec's benign look-alike set (questions about "killing a process" or "mixing cleaning
products" answered helpfully).

Deep alignment (Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep"): with
``deep_alignment > 0`` that fraction of refusal examples become *safety-recovery examples*: the assistant turn
starts with the first k words of a harmful answer to the same request and then refuses. As in the paper (and its
code), k is drawn uniformly from 1 to the answer's length capped at ``deep_alignment_max_prefix_words`` (the paper
caps at 100 tokens), and the harmful prefix carries no loss (:attr:`tunesec.data.schema.Message.loss_start`): the
model learns to break off into a refusal, not to write the prefix. The harmful answers are the model's own (greedy
answers of the model being aligned to those requests; an unaligned model answers most of them), so no
harmful-answer dataset is needed; a request the model already refuses, or answers in under ``deep_alignment_min_words``
words, stays a plain refusal example. The refusal starts after a blank line, so its opener has the same tokens as
at the start of an answer; the blank line is learned. Measure the effect with the prefilling attack (``tunesec eval
M --task harmfulness --task-option prefill=target``; docs/RESULTS.md). An earlier version used generic openers
("Sure, here is") with the loss on the opener too, which taught a 135M model to emit the openers (docs/RESULTS.md,
v14).

Self-distilled helpful answers (``self_distill``): benign prompts answered by the model being aligned itself
(greedy), refusals dropped. Refusals are short and alike, so a small model fits them far more easily than
human-written helpful answers, and it learns "a question -> refuse" (measured on SmolLM2-135M: 65% refusal of
XSTest's safe prompts with a human-only helpful mix). Answers in the model's own words cost it almost no loss,
so they hold its helpful behaviour in place while the refusals are learned; this is the self-distillation idea
of Yang et al. 2024 ("Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning"), applied to the
benign side of the mix. The answers are as accurate as the model is: they teach behaviour, not facts.

Decision loss (``decision_loss > 0``): an extra cross-entropy on refusing vs answering at each answer's first
tokens (:mod:`tunesec.defenses.alignment.decision_loss`), a decision that otherwise carries a tiny share of the
per-token loss. Measured on SmolLM2-135M (docs/RESULTS.md, v17/v17r): JBB-harmful refusal 82% -> 90-91% and
XSTest-safe over-refusal 12% -> 3-4% on the same examples; the shipped recipe uses weight 1.0.

Prompts of the evaluation sets (AdvBench, JBB, XSTest) are removed from the training mix, so the evaluation
stays held out.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from tunesec.config import Config
from tunesec.data.schema import Example, Message, count_words, first_words, last_sentence_end
from tunesec.defenses.alignment.refusal_filter import RefusalFilterConfig, benign_margins, benign_prompt_sample
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.registry import register
from tunesec.training.config import TrainConfig
from tunesec.training.hooks import TrainingHook

# Between the harmful prefix of a safety-recovery example and its refusal (see the module docstring).
RECOVERY_BREAK = "\n\n"


def _default_training() -> TrainConfig:
    return TrainConfig(
        method="lora",
        lora_r=8,
        lora_alpha=16.0,
        learning_rate=3e-4,
        max_steps=60,
        per_device_batch_size=8,
        max_seq_len=256,
        warmup_steps=0.1,
        lr_scheduler="cosine",
        save_steps=20,
        logging_steps=5,
    )


class SafetySFTConfig(Config):
    """The alignment mix and its training run (defaults: a balanced mix, LoRA r=8 on all projections)."""

    refusal_data: dict[str, int] = Field(
        default_factory=lambda: {"safety-tuned-llamas": 240, "tunesec-refusals": 60},
        description="Refusal datasets (name or path) -> how many examples to draw from each.",
    )
    benign_data: dict[str, int] = Field(
        default_factory=lambda: {"alpaca": 170, "dolly": 70, "tunesec-helpful": 60},
        description="Helpful-answer datasets (name or path) -> how many examples to draw from each.",
    )
    self_distill: dict[str, int] = Field(
        default_factory=dict,
        description="Benign prompt datasets (name or path) -> how many prompts the model being aligned answers "
        "itself (greedy; refusals and near-empty answers dropped) to join the helpful side of the mix.",
    )
    self_distill_max_new_tokens: int = Field(160, ge=16, description="Token limit of self-distilled answers.")
    self_distill_max_prompt_chars: int = Field(
        300, ge=20, description="Longer prompts (e.g. with a context passage) are not used for self-distillation."
    )
    deep_alignment: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of refusal examples turned into safety-recovery examples: the model's own harmful "
        "answer, cut after k words, then the refusal; the prefix carries no loss (Qi et al. 2024; the paper uses 0.5).",
    )
    deep_alignment_max_prefix_words: int = Field(
        75, ge=1, description="Upper bound of k, the harmful prefix's length in words (k is uniform in 1..bound)."
    )
    deep_alignment_min_words: int = Field(
        5, ge=1, description="Shorter harmful answers are not used as prefixes (the example stays a plain refusal)."
    )
    decision_loss: float = Field(
        0.0,
        ge=0.0,
        description="Weight of an extra loss on the refuse/answer decision at each answer's first tokens "
        "(tunesec.defenses.alignment.decision_loss); 0 = off.",
    )
    decision_refusal_weight: float = Field(
        1.0,
        gt=0.0,
        description="Weight of refusals relative to answers in the decision loss; above 1 leans towards refusing.",
    )
    decision_continue_weight: float = Field(
        0.0,
        ge=0.0,
        description="With deep_alignment: weight of a term that keeps benign answers from breaking off into a "
        "refusal (log(1 - P(break)) at each answer token, tunesec.defenses.alignment.decision_loss); 0 = off.",
    )
    decision_whole_opener: bool = Field(
        True,
        description="Score a refusal on its whole opener ('I'm sorry'), not only its first token ('I'), in the "
        "decision loss.",
    )
    refusal_filter: RefusalFilterConfig | None = Field(
        None,
        description="Screen each refusal dataset before drawing from it: prompts nearer to benign instructions "
        "than to the rest of the refusal data are dropped (see tunesec.defenses.alignment.refusal_filter). "
        "{} = the defaults; null = off.",
    )
    exclude_eval: list[str] = Field(
        default_factory=lambda: ["advbench", "jbb-harmful", "jbb-benign", "xstest"],
        description="Evaluation datasets whose prompts are removed from the training mix (held out).",
    )
    max_response_chars: int = Field(
        600, ge=50, description="Responses are cut at a sentence end before this many characters (shorter steps)."
    )
    seed: int = Field(0, description="Seed of the data sampling and mixing.")
    training: TrainConfig = Field(default_factory=_default_training, description="Training hyperparameters.")

    @field_validator("refusal_data", "benign_data", "self_distill")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        for name, n in v.items():
            if n < 0:
                raise ValueError(f"{name}: count must be >= 0")
        return v


def _norm_prompt(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = last_sentence_end(cut)
    return cut[: end + 1] if end > limit // 3 else cut.rstrip() + "..."


def _eval_prompts(names: Sequence[str]) -> set[str]:
    from tunesec.data import load_dataset_by_name

    prompts: set[str] = set()
    for name in names:
        try:
            prompts.update(_norm_prompt(e.prompt) for e in load_dataset_by_name(name))
        except UsageError:
            continue  # an eval set that is not available locally cannot leak into training either
    return prompts


def _draw(
    spec: str, examples: list[Example], n: int, seed: int, held_out: set[str], kind: str, screen: _Screen | None = None
) -> list[Example]:
    """``n`` examples of dataset ``spec`` (loaded as ``examples``), seeded, held-out prompts and screened ones out."""
    from tunesec.attacks.base import require_assistant_turns

    require_assistant_turns(examples, f"{kind} dataset {spec}")
    pool = [e for e in examples if _norm_prompt(e.prompt) not in held_out]
    if screen is not None and n > 0 and screen.screens(spec):
        pool = screen(spec, pool)
    if n > len(pool):
        raise UsageError(f"{kind} dataset {spec}: asked for {n} examples but only {len(pool)} are usable")
    rng = random.Random(f"{seed}:{spec}")
    return rng.sample(pool, n)


class _Screen:
    """The refusal filter over all refusal datasets of a mix; notes what it drops from each.

    Margins are computed once over the union of the refusal datasets, so each prompt's "own" neighbours come
    from all the refusal data: a small hand-written set (tunesec-refusals, 60 prompts on 60 topics) would
    otherwise find few close neighbours of its own and look benign next to thousands of instructions.
    """

    def __init__(
        self, config: RefusalFilterConfig, seed: int, datasets: Sequence[list[Example]], notes: list[str] | None
    ) -> None:
        prompts = sorted({_norm_prompt(e.prompt): e.prompt for examples in datasets for e in examples}.items())
        self.config = config
        self.notes = notes
        self.margin: dict[str, float] = {}
        if len(prompts) >= 2:
            values = benign_margins([p for _, p in prompts], benign_prompt_sample(config, seed), config.k)
            self.margin = {key: m for (key, _), m in zip(prompts, values, strict=True)}

    def screens(self, spec: str) -> bool:
        """Whether the refusal dataset ``spec`` is screened."""
        return self.config.datasets is None or spec in self.config.datasets

    def __call__(self, spec: str, pool: list[Example]) -> list[Example]:
        scored = [(e, self.margin.get(_norm_prompt(e.prompt))) for e in pool]
        kept = [
            e if m is None else e.model_copy(update={"meta": {**e.meta, "benign_margin": round(m, 4)}})
            for e, m in scored
            if m is None or m <= self.config.max_margin
        ]
        if self.notes is not None:
            dropped = sorted(
                ((m, e.prompt) for e, m in scored if m is not None and m > self.config.max_margin), reverse=True
            )
            examples = "; ".join(repr(p[:60]) for _, p in dropped[:3])
            self.notes.append(
                f"refusal_filter: {spec}: dropped {len(dropped)} of {len(pool)} prompts that look benign"
                + (f" (e.g. {examples})" if dropped else "")
            )
        return kept


def build_alignment_data(
    config: SafetySFTConfig,
    model: ModelRef | str | None = None,
    *,
    generator: Any = None,
    progress: bool = True,
    notes: list[str] | None = None,
) -> list[Example]:
    """The shuffled training mix: refusals (some deep-aligned) and helpful answers, eval prompts removed.

    Args:
        config: The mix.
        model: The model being aligned; needed when ``config.self_distill`` asks for self-distilled answers.
        generator: A ready generator for ``model`` (default: a :class:`~tunesec.models.gen_cache.CachedGenerator`
            of ``model``, so answers it gave for the same prompts and settings before are reused).
        progress: Show a progress bar while generating self-distilled answers.
        notes: If given, one line per screened refusal dataset is appended (what the filter dropped).
    """
    from tunesec.attacks.base import load_data

    held_out = _eval_prompts(config.exclude_eval)
    rng = random.Random(config.seed)
    refusal_sets = {spec: load_data(spec) for spec in config.refusal_data}
    screen = None
    if config.refusal_filter is not None:
        drawn_from = [refusal_sets[spec] for spec, n in config.refusal_data.items() if n > 0]
        screen = _Screen(config.refusal_filter, config.seed, drawn_from, notes)
    refusals: list[Example] = []
    for spec, n in config.refusal_data.items():
        refusals.extend(_draw(spec, refusal_sets[spec], n, config.seed, held_out, "refusal", screen))
    benign: list[Example] = []
    for spec, n in config.benign_data.items():
        benign.extend(_draw(spec, load_data(spec), n, config.seed, held_out, "benign"))
    if not refusals:
        raise UsageError("refusal_data: the alignment mix needs at least one refusal example")
    if generator is None and model is not None:
        from tunesec.models.gen_cache import CachedGenerator

        generator = CachedGenerator(model)  # the model's answers are reused across mixes (loaded on a miss)
    out: list[Example] = []
    n_deep = round(len(refusals) * config.deep_alignment)
    deep = rng.sample(refusals, n_deep)
    prefixes: dict[str, str] = {}
    if deep:
        if model is None and generator is None:
            raise UsageError("deep_alignment: safety-recovery examples need the model being aligned (pass model=)")
        prefixes = harmful_prefixes(config, deep, generator, progress=progress)
        if notes is not None:
            notes.append(
                f"deep_alignment: {len(prefixes)} of {n_deep} refusal examples became safety-recovery examples "
                f"(the model refused or barely answered the other {n_deep - len(prefixes)})"
            )
    for ex in refusals:
        text = _shorten(ex.messages[-1].content, config.max_response_chars)
        if ex.id in prefixes:
            prefix = prefixes[ex.id]
            turn = Message(role="assistant", content=prefix + RECOVERY_BREAK + text, loss_start=len(prefix))
            messages = [*ex.messages[:-1], turn]
            meta = {**ex.meta, "align_kind": "deep-refusal", "prefix_words": len(prefix.split())}
            out.append(ex.model_copy(update={"messages": messages, "meta": meta}))
        else:
            out.append(_with_response(ex, text, "refusal"))
    for ex in benign:
        out.append(_with_response(ex, _shorten(ex.messages[-1].content, config.max_response_chars), "helpful"))
    if config.self_distill:
        if model is None and generator is None:
            raise UsageError("self_distill: self-distilled answers need the model being aligned (pass model=)")
        used = held_out | {_norm_prompt(e.prompt) for e in out}
        out.extend(self_distilled_answers(config, model, used, generator=generator, progress=progress))
    rng.shuffle(out)
    return out


def self_distilled_answers(
    config: SafetySFTConfig,
    model: ModelRef | str | None,
    exclude: set[str],
    *,
    generator: Any = None,
    progress: bool = True,
) -> list[Example]:
    """Benign prompts of ``config.self_distill`` answered by ``model`` itself (see the module docstring).

    From each dataset, single-turn prompts not in ``exclude`` (normalized text) and not longer than
    ``self_distill_max_prompt_chars`` are shuffled (seeded); half again as many as asked are answered greedily,
    and the first answers that are not refusals (``refusal-keywords``) and not near-empty are kept, cut at their
    last sentence end when the token limit stopped them. A dataset that yields fewer keeps what it has.
    """
    from tunesec.attacks.base import load_data
    from tunesec.judges import get_judge
    from tunesec.judges.base import JudgeInput
    from tunesec.models import GenerationConfig, get_generator

    candidates: list[tuple[str, Example]] = []
    wanted: dict[str, int] = {}
    for spec, n in config.self_distill.items():
        pool = [
            e
            for e in load_data(spec)
            if [m.role for m in e.prompt_messages] == ["user"]
            and len(e.prompt) <= config.self_distill_max_prompt_chars
            and _norm_prompt(e.prompt) not in exclude
        ]
        random.Random(f"{config.seed}:self-distill:{spec}").shuffle(pool)
        candidates.extend((spec, e) for e in pool[: (3 * n + 1) // 2])
        wanted[spec] = n
    if not candidates:
        return []
    gen = generator if generator is not None else get_generator(model if model is not None else "")
    gens = gen.generate(
        [e.prompt for _, e in candidates],
        GenerationConfig(max_new_tokens=config.self_distill_max_new_tokens),
        progress=progress,
    )
    verdicts = get_judge("refusal-keywords").score(
        [JudgeInput(prompt=e.prompt, response=g.text) for (_, e), g in zip(candidates, gens, strict=True)]
    )
    kept: list[Example] = []
    count = dict.fromkeys(wanted, 0)
    for (spec, ex), g, v in zip(candidates, gens, verdicts, strict=True):
        text = g.text.strip()
        if count[spec] >= wanted[spec] or v.refused or len(text) < 40:
            continue
        if g.finish_reason == "length":
            end = last_sentence_end(text)
            if end < 40:
                continue
            text = text[: end + 1]
        count[spec] += 1
        kept.append(
            Example(
                id=f"self-distilled-{ex.id}",
                messages=[
                    *ex.prompt_messages,
                    Message(role="assistant", content=_shorten(text, config.max_response_chars)),
                ],
                source=f"self-distilled:{ex.source}",
                category=ex.category,
                meta={"align_kind": "helpful", "self_distilled": True},
            )
        )
    return kept


def harmful_prefixes(
    config: SafetySFTConfig, examples: Sequence[Example], generator: Any, *, progress: bool = True
) -> dict[str, str]:
    """Harmful prefixes for safety-recovery examples: example id -> the first k words of the model's own answer.

    Each example's request is answered greedily by ``generator`` (the model being aligned); an answer the
    ``refusal-keywords`` judge calls a refusal, or one under ``deep_alignment_min_words`` words, gives no
    prefix. k is uniform in 1..min(words, ``deep_alignment_max_prefix_words``) (seeded), and the prefix keeps
    the answer's own spacing up to the end of its k-th word.
    """
    from tunesec.judges import get_judge
    from tunesec.judges.base import JudgeInput
    from tunesec.models import GenerationConfig

    if not examples:
        return {}
    words_cap = config.deep_alignment_max_prefix_words
    gens = generator.generate(
        [e.prompt_chat() for e in examples],
        GenerationConfig(max_new_tokens=2 * words_cap),
        progress=progress,
    )
    verdicts = get_judge("refusal-keywords").score(
        [JudgeInput(prompt=e.prompt, response=g.text) for e, g in zip(examples, gens, strict=True)]
    )
    rng = random.Random(f"{config.seed}:deep-alignment")
    out: dict[str, str] = {}
    for ex, g, v in zip(examples, gens, verdicts, strict=True):
        text = g.text.strip()
        n_words = count_words(text)
        if v.refused or n_words < config.deep_alignment_min_words:
            continue
        out[ex.id] = first_words(text, rng.randint(1, min(n_words, words_cap)))
    return out


def _with_response(ex: Example, text: str, kind: str) -> Example:
    messages = [*ex.messages[:-1], Message(role="assistant", content=text)]
    return ex.model_copy(update={"messages": messages, "meta": {**ex.meta, "align_kind": kind}})


@register(
    "defense",
    "safety-sft",
    description="No extra defense: the alignment SFT recipe itself (refusals + helpful answers, Bianchi et al. "
    "2024; optional deep alignment, Qi et al. 2024; the decision loss). The baseline of every alignment defense.",
    stage="alignment",
    paper="Bianchi et al. 2024, arXiv 2309.07875; Qi et al. 2024, arXiv 2406.05946",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class SafetySFT:
    """Alignment-stage defense: train a LoRA adapter that refuses harmful requests and stays helpful.

    See the module docstring for the papers and the mix.
    """

    name = "safety-sft"
    config_class = SafetySFTConfig

    @classmethod
    def base_config(cls) -> SafetySFTConfig:
        """Its defaults as a defense (``tunesec defend``, ``tunesec.defend``): the shipped aligned recipe.

        ``SafetySFT()`` itself (and ``tunesec align`` without ``--recipe``) keeps :class:`SafetySFTConfig`'s
        balanced built-in mix.
        """
        from tunesec.defenses.base import shipped_alignment_config

        return shipped_alignment_config()

    def __init__(self, config: SafetySFTConfig | dict[str, Any] | None = None) -> None:
        """Build the defense with a config (instance, mapping or defaults)."""
        if config is None:
            config = SafetySFTConfig()
        elif isinstance(config, dict):
            from tunesec.config import validate

            config = validate(SafetySFTConfig, config, source="safety-sft config")
        self.config = config

    def run(
        self,
        model: ModelRef | str,
        out_dir: str | Path,
        data: Sequence[Example] | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        notes: list[str] | None = None,
    ) -> ModelRef:
        """Align ``model``; the adapter goes to ``out_dir/model`` and its ref is returned.

        Args:
            model: The model to align.
            out_dir: Run directory.
            data: A ready training mix (default: :func:`build_alignment_data` of the config).
            resume: Continue from the last checkpoint in ``out_dir``.
            progress: Show a progress bar.
            notes: Lines for the user (what building the mix dropped) are appended here.
        """
        from tunesec.attacks.base import finetune_with_provenance

        examples = (
            list(data) if data is not None else build_alignment_data(self.config, model, progress=progress, notes=notes)
        )
        kinds = {k: sum(1 for e in examples if e.meta.get("align_kind") == k) for k in ("refusal", "deep-refusal")}
        kinds["helpful"] = len(examples) - kinds["refusal"] - kinds["deep-refusal"]
        kinds["self-distilled"] = sum(1 for e in examples if e.meta.get("self_distilled"))
        hooks: list[TrainingHook] = []
        if self.config.decision_loss > 0:
            from tunesec.defenses.alignment.decision_loss import RefusalDecisionLoss

            hooks.append(
                RefusalDecisionLoss(
                    self.config.decision_loss,
                    refusal_weight=self.config.decision_refusal_weight,
                    whole_opener=self.config.decision_whole_opener,
                    continue_weight=self.config.decision_continue_weight,
                )
            )
        return finetune_with_provenance(
            component={"defense": self.name},
            parent=model,
            examples=examples,
            training=self.config.training,
            config_dump=self.config.model_dump(mode="json"),
            out_dir=out_dir,
            resume=resume,
            progress=progress,
            extra_provenance={"mix": kinds},
            hooks=hooks,
        )
