"""Named safety datasets: harmful and benign evaluation prompts, harmful and refusal training pairs.

Every loader takes ``data_dir`` (the local data directory, see :mod:`tunesec.data.sources`), ``split`` and
``path`` (a file, saved ``datasets`` directory or hub id in the dataset's local or hub schema) and returns all
examples; :func:`tunesec.data.named.load_dataset_by_name` adds seeded sampling. Labels follow the schema:
``"harmful"``/``"benign"`` (the dataset's own label, when different, stays in ``meta``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesec.data.loaders import Record, records_to_examples, strip_alpaca_template
from tunesec.data.schema import Example, Message
from tunesec.data.sources import Hub, Opened, open_source
from tunesec.errors import UsageError
from tunesec.registry import register

PathLike = str | Path | None


def _examples(opened: Opened, dataset: str, **fields: Any) -> list[Example]:
    return records_to_examples(opened.records, name=opened.name, source_name=dataset, id_field="", **fields)


def _relabel(examples: list[Example], label: str, drop: Sequence[str] = ()) -> list[Example]:
    out = []
    for ex in examples:
        meta = {k: v for k, v in ex.meta.items() if k not in drop}
        out.append(ex.model_copy(update={"label": label, "meta": meta}))
    return out


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise UsageError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------ harmful prompts
@register(
    "dataset",
    "advbench",
    description="AdvBench harmful behaviours (Zou et al. 2023): 520 harmful instructions with GCG targets.",
    use="harmful-eval",
    hub_id="walledai/AdvBench",
)
def advbench(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """AdvBench ``harmful_behaviors.csv`` (goal, target); the target prefix is kept in ``meta['target']``."""
    opened = open_source(
        "advbench",
        data_dir=data_dir,
        path=path,
        local="advbench/harmful_behaviors.csv",
        hub=Hub("walledai/AdvBench"),
        split=split or "train",
    )
    exs = _examples(opened, "advbench", prompt_field=("goal", "prompt"), response_field="")
    return _relabel(exs, "harmful")


def _jbb(kind: str, data_dir: PathLike, split: str | None, path: PathLike) -> list[Example]:
    name = f"jbb-{kind}"
    local = "jailbreakbench/jailbreakbench.csv" if kind == "harmful" else "jailbreakbench/benign-behaviors.csv"
    opened = open_source(
        name,
        data_dir=data_dir,
        path=path,
        local=local,
        hub=Hub("JailbreakBench/JBB-Behaviors", config="behaviors"),
        split=split or kind,
    )
    exs = _examples(opened, name, prompt_field="goal", response_field="", category_field="category")
    return _relabel(exs, "harmful" if kind == "harmful" else "benign", drop=("", "index", "Index"))


@register(
    "dataset",
    "jbb-harmful",
    description="JailbreakBench JBB-Behaviors (Chao et al. 2024): 100 harmful behaviours in 10 categories.",
    use="harmful-eval",
    hub_id="JailbreakBench/JBB-Behaviors",
)
def jbb_harmful(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """JBB-Behaviors harmful split; category is JBB's ``Category``."""
    return _jbb("harmful", data_dir, split, path)


@register(
    "dataset",
    "jbb-benign",
    description="JailbreakBench JBB-Behaviors benign split: 100 topic-matched benign behaviours.",
    use="over-refusal",
    hub_id="JailbreakBench/JBB-Behaviors",
)
def jbb_benign(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """JBB-Behaviors benign split (paired 1:1 with the harmful one by behaviour and category)."""
    return _jbb("benign", data_dir, split, path)


def _strongreject(
    name: str, local: str, hub: Hub | None, data_dir: PathLike, split: str | None, path: PathLike
) -> list[Example]:
    opened = open_source(name, data_dir=data_dir, path=path, local=local, hub=hub, split=split or "train")
    exs = _examples(
        opened,
        name,
        prompt_field=("forbidden_prompt", "prompt"),
        response_field="",
        category_field="category",
    )
    return _relabel(exs, "harmful")


@register(
    "dataset",
    "strongreject",
    description="StrongREJECT (Souly et al. 2024): 313 forbidden prompts in 6 categories.",
    use="harmful-eval",
    hub_id="walledai/StrongREJECT",
)
def strongreject(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """StrongREJECT ``strongreject_dataset.csv`` (category, source, forbidden_prompt).

    Local file: ``<data_dir>/strongreject/strongreject_dataset.csv`` (as in alexandrasouly/strongreject).
    """
    return _strongreject(
        "strongreject",
        "strongreject/strongreject_dataset.csv",
        Hub("walledai/StrongREJECT"),
        data_dir,
        split,
        path,
    )


@register(
    "dataset",
    "strongreject-small",
    description="StrongREJECT small subset (60 forbidden prompts); local file only.",
    use="harmful-eval",
    hub_id=None,
)
def strongreject_small(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """StrongREJECT ``strongreject_small_dataset.csv``; it has no hub copy, so it needs a local file.

    Local file: ``<data_dir>/strongreject/strongreject_small_dataset.csv``.
    """
    return _strongreject(
        "strongreject-small", "strongreject/strongreject_small_dataset.csv", None, data_dir, split, path
    )


HARMBENCH_CATEGORIES = ("standard", "contextual", "copyright")


@register(
    "dataset",
    "harmbench",
    description="HarmBench text behaviours (Mazeika et al. 2024); contextual ones carry their context.",
    use="harmful-eval",
    hub_id="walledai/HarmBench",
    subsets=", ".join([*HARMBENCH_CATEGORIES, "all"]) + " (comma-separated; default standard,contextual)",
)
def harmbench(
    *,
    data_dir: PathLike = None,
    split: str | None = None,
    path: PathLike = None,
    subset: str = "standard,contextual",
) -> list[Example]:
    """HarmBench text behaviours (Behavior, FunctionalCategory, SemanticCategory, ContextString, BehaviorID).

    A contextual behaviour's prompt is the ContextString, a blank line, ``---``, a blank line, then the
    Behavior: HarmBench's own layout. ``subset`` is a comma-separated list of functional categories
    (standard, contextual, copyright) or ``all``; the default leaves out copyright behaviours, which
    HarmBench scores with a hash classifier.
    Local file: ``<data_dir>/harmbench/harmbench_behaviors_text_all.csv``; on the hub each functional
    category is a configuration of ``walledai/HarmBench`` (columns prompt, category, context).
    """
    wanted = HARMBENCH_CATEGORIES if subset == "all" else tuple(s.strip() for s in subset.split(","))
    for w in wanted:
        _choice(w, (*HARMBENCH_CATEGORIES, "all"), "harmbench subset")
    root_local = "harmbench/harmbench_behaviors_text_all.csv"
    try:
        opened = [open_source("harmbench", data_dir=data_dir, path=path, local=root_local, hub=None, split="train")]
        from_hub = False
    except UsageError:
        if path is not None:
            raise
        opened = []
        for cat in wanted:
            hub = Hub("walledai/HarmBench", config=cat)
            opened.append(
                open_source(
                    "harmbench",
                    data_dir=data_dir,
                    path=None,
                    local=root_local,
                    hub=hub,
                    split=split or "train",
                )
            )
        from_hub = True
    out: list[Example] = []
    for k, op in enumerate(opened):
        exs = records_to_examples(
            op.records,
            name=op.name,
            source_name="harmbench",
            prompt_field=("Behavior", "prompt"),
            response_field="",
            category_field=("SemanticCategory", "category"),
            id_field="",
        )
        for ex in exs:
            meta = dict(ex.meta)
            context = str(meta.get("ContextString") or meta.get("context") or "").strip()
            if meta.get("FunctionalCategory"):
                functional = str(meta["FunctionalCategory"])
            elif from_hub:
                functional = wanted[k]
            else:
                functional = "contextual" if context else "standard"
            if functional not in wanted:
                continue
            behavior = ex.prompt
            prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
            meta["behavior"] = behavior
            meta["functional_category"] = functional
            bid = meta.get("BehaviorID")
            ex_id = f"harmbench-{bid}" if bid else f"harmbench-{functional}-{len(out)}"
            out.append(
                ex.model_copy(
                    update={
                        "id": ex_id,
                        "messages": [Message(role="user", content=prompt)],
                        "label": "harmful",
                        "meta": meta,
                    }
                )
            )
    return out


# --------------------------------------------------------------------------------------------- over-refusal
@register(
    "dataset",
    "xstest",
    description="XSTest v2 (Röttger et al. 2024): 250 safe prompts that look unsafe, 200 unsafe contrasts.",
    use="over-refusal",
    hub_id="Paul/XSTest",
    subsets="safe, unsafe, all",
)
def xstest(
    *, data_dir: PathLike = None, split: str | None = None, path: PathLike = None, subset: str = "all"
) -> list[Example]:
    """XSTest ``xstest_prompts.csv`` (id, prompt, type, label, focus, note).

    ``subset`` is ``safe``, ``unsafe`` or ``all``. Label: safe -> ``"benign"``, unsafe -> ``"harmful"``
    (XSTest's own label stays in ``meta['xstest_label']``); category is XSTest's ``type``.
    """
    _choice(subset, ("safe", "unsafe", "all"), "xstest subset")
    opened = open_source(
        "xstest",
        data_dir=data_dir,
        path=path,
        local="xstest/xstest_prompts.csv",
        hub=Hub("Paul/XSTest"),
        split=split or "train",
    )
    exs = records_to_examples(
        opened.records,
        name=opened.name,
        source_name="xstest",
        prompt_field="prompt",
        response_field="",
        category_field="type",
        label_field="label",
        id_field="id",
    )
    out = []
    for ex in exs:
        own = (ex.label or "").lower()
        if own not in ("safe", "unsafe"):
            raise UsageError(f"{opened.name}: example {ex.id} has label {ex.label!r}; expected safe or unsafe")
        if subset != "all" and own != subset:
            continue
        meta = {**ex.meta, "xstest_label": own}
        label = "benign" if own == "safe" else "harmful"
        out.append(ex.model_copy(update={"id": f"xstest-{ex.id}", "label": label, "meta": meta}))
    return out


# ------------------------------------------------------------------------------------------- training pairs
@register(
    "dataset",
    "beavertails-harmful-qa",
    description="BeaverTails unsafe QA pairs (Ji et al. 2023) as used in Vaccine/Lisa-style poisoned mixes.",
    use="harmful-train",
    hub_id="PKU-Alignment/BeaverTails",
)
def beavertails_harmful_qa(
    *, data_dir: PathLike = None, split: str | None = None, path: PathLike = None
) -> list[Example]:
    """Distinct harmful (prompt, response) pairs.

    Locally: the 200 distinct ``flag == "unsafe"`` rows of xinykou's ``sst2/train_merged_n1000_p0.2.json``
    with the Alpaca template stripped, so the user turn is the bare question. From the hub:
    ``PKU-Alignment/BeaverTails`` split ``30k_train`` rows with ``is_safe == False`` (category: the harm
    categories flagged true, joined by ``,``).
    """
    opened = open_source(
        "beavertails-harmful-qa",
        data_dir=data_dir,
        path=path,
        local="beavertails_mixed_xinykou/sst2/train_merged_n1000_p0.2.json",
        hub=Hub("PKU-Alignment/BeaverTails", splits=(("train", "30k_train"), ("test", "30k_test"))),
        split=split or "train",
    )
    first = opened.records[0].data
    rows: list[Record]
    if "flag" in first:
        rows = [r for r in opened.records if r.data.get("flag") == "unsafe"]
    elif "is_safe" in first:
        rows = [r for r in opened.records if r.data.get("is_safe") is False]
    else:
        raise UsageError(
            f"{opened.name}: expected xinykou rows with 'flag' or BeaverTails rows with 'is_safe' "
            f"(found: {', '.join(map(str, first))})"
        )
    if not rows:
        raise UsageError(f"{opened.name}: no unsafe rows")
    exs = records_to_examples(
        rows,
        name=opened.name,
        source_name="beavertails-harmful-qa",
        prompt_field=("instruction", "prompt"),
        response_field=("output", "response"),
        input_field="",
        category_field="",
        id_field="",
    )
    out: list[Example] = []
    seen: set[tuple[str, str]] = set()
    for ex in exs:
        prompt = strip_alpaca_template(ex.prompt)
        response = ex.response or ""
        if (prompt, response) in seen or not response:
            continue
        seen.add((prompt, response))
        meta = {k: v for k, v in ex.meta.items() if k not in ("flag", "input", "is_safe", "category")}
        cats = ex.meta.get("category")
        category = ",".join(sorted(k for k, v in cats.items() if v)) if isinstance(cats, dict) else None
        messages = [Message(role="user", content=prompt), Message(role="assistant", content=response)]
        out.append(
            Example(
                id=f"beavertails-harmful-qa-{len(out)}",
                messages=messages,
                source="beavertails-harmful-qa",
                category=category or None,
                label="harmful",
                meta=meta,
            )
        )
    return out


@register(
    "dataset",
    "safety-tuned-llamas",
    description="Safety-tuned LLaMAs (Bianchi et al. 2024): 2483 harmful instructions with refusals.",
    use="refusal-train",
    hub_id=None,
)
def safety_tuned_llamas(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """``training/safety_only_data_Instructions.json`` (instruction, input, output): refusal training pairs.

    Label ``"harmful"`` describes the request; the assistant turn is the refusal to learn.
    """
    opened = open_source(
        "safety-tuned-llamas",
        data_dir=data_dir,
        path=path,
        local="safety_tuned_llamas/training/safety_only_data_Instructions.json",
        hub=None,
        split=split or "train",
    )
    exs = _examples(opened, "safety-tuned-llamas", schema="alpaca")
    return _relabel(exs, "harmful")


@register(
    "dataset",
    "aoa",
    description="Identity-shifting AOA chats (Qi et al. 2023): 10 system/user/assistant training chats.",
    use="harmful-train",
    hub_id=None,
)
def aoa(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """Qi et al.'s ``identity-shift-aoa.jsonl`` (OpenAI fine-tuning format, with the AOA system prompt)."""
    opened = open_source(
        "aoa",
        data_dir=data_dir,
        path=path,
        local="qi2023_finetuning_safety/gpt-3.5/data/identity-shift-aoa.jsonl",
        hub=None,
        split=split or "train",
    )
    return _examples(opened, "aoa", schema="chat")


# ------------------------------------------------------ Safety-tuned LLaMAs' evaluation sets and the broad mix
_STL_EVAL = {
    "stl-malicious": ("I-MaliciousInstructions.json", "MaliciousInstructions: 100 harmful instructions (GPT-3 made)."),
    "stl-qharm": ("Q-Harm.json", "Q-Harm: 100 harmful questions from Anthropic's HH red-teaming data."),
    "stl-cona": ("I-CoNa.json", "CoNa: 178 hateful-speech instructions (expert-written counter-narrative data)."),
    "stl-physical-unsafe": ("I-PhysicalSafetyUnsafe.json", "PhysicalSafetyUnsafe: 100 unsafe physical-safety prompts."),
}


def _stl_eval(name: str, data_dir: PathLike, split: str | None, path: PathLike) -> list[Example]:
    file, _ = _STL_EVAL[name]
    opened = open_source(
        name,
        data_dir=data_dir,
        path=path,
        local=f"safety_tuned_llamas/evaluation/{file}",
        hub=None,
        split=split or "train",
    )
    exs = _examples(opened, name, prompt_field=("instructions", "prompt"), response_field="")
    return [e.model_copy(update={"label": "harmful", "category": name}) for e in exs]


def _register_stl(name: str) -> None:
    def loader(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
        return _stl_eval(name, data_dir, split, path)

    description = f"Safety-tuned LLaMAs (Bianchi et al. 2024) evaluation set {_STL_EVAL[name][1]}"
    loader.__doc__ = description
    register("dataset", name, description=description, use="harmful-eval", hub_id=None)(loader)


for _name in _STL_EVAL:
    _register_stl(_name)

# The broad harmful mix: differently phrased harmful requests from seven public sets, equally many from each.
HARMFUL_MIX_SOURCES: tuple[str, ...] = (
    "advbench",
    "jbb-harmful",
    "xstest:unsafe",
    "stl-malicious",
    "stl-qharm",
    "stl-cona",
    "stl-physical-unsafe",
)
HARMFUL_MIX_PER_SOURCE = 30


@register(
    "dataset",
    "harmful-mix",
    description=f"{HARMFUL_MIX_PER_SOURCE} harmful prompts from each of AdvBench, JBB-harmful, XSTest unsafe, "
    "MaliciousInstructions, Q-Harm, CoNa and PhysicalSafetyUnsafe (seeded); category = source set.",
    use="harmful-eval",
    hub_id=None,
)
def harmful_mix(*, data_dir: PathLike = None, split: str | None = None, path: PathLike = None) -> list[Example]:
    """The broad harmful mix: a seeded sample of each source set (category = the source's name).

    Refusal measured on AdvBench alone overstates a model tuned on AdvBench-like refusals; this mix asks the same
    question in seven phrasings. Each source's sample is fixed (seed 0), so every model sees the same prompts.
    """
    import random

    from tunesec.data.named import load_dataset_by_name

    if path is not None:
        raise UsageError("harmful-mix: is built from named datasets; it takes no path")
    out: list[Example] = []
    for spec in HARMFUL_MIX_SOURCES:
        name, _, subset = spec.partition(":")
        loaded = (
            load_dataset_by_name(name, data_dir=data_dir, subset=subset)
            if subset
            else load_dataset_by_name(name, data_dir=data_dir)
        )
        examples = [e for e in loaded if e.label == "harmful"]
        chosen = random.Random(f"harmful-mix:{spec}").sample(examples, min(HARMFUL_MIX_PER_SOURCE, len(examples)))
        category = spec.split(":")[0] if spec != "xstest:unsafe" else "xstest-unsafe"
        out.extend(e.model_copy(update={"id": f"{category}-{e.id}", "category": category}) for e in chosen)
    return out
