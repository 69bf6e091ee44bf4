"""Named benign task datasets: utility evaluation (SST-2, AG News, GSM8K) and benign fine-tuning data.

Utility sets carry the reference answer in ``label`` and a prompt that asks for just the answer, so an
evaluator compares the model's answer with ``label``. With ``answer=True`` (the default for the train split)
the reference answer is also the assistant turn, which makes the set a benign fine-tuning set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunesec.data.loaders import Record, records_to_examples, strip_alpaca_template
from tunesec.data.schema import Example, Message
from tunesec.data.sources import Hub, Opened, open_source
from tunesec.errors import UsageError
from tunesec.registry import register

PathLike = str | Path | None

SST2_PROMPT = (
    "What is the sentiment of the following sentence? Answer with just one word: positive or negative.\n\n"
    "Sentence: {sentence}"
)
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
AGNEWS_PROMPT = (
    "Which topic is the following news article about? Answer with just one of: World, Sports, Business, "
    "Sci/Tech.\n\nArticle: {text}"
)
GSM8K_PROMPT = "Solve the following math problem. Answer with just the final number.\n\n{question}"


def _field(opened: Opened, rec: Record, *keys: str) -> Any:
    for k in keys:
        if k in rec.data:
            return rec.data[k]
    raise UsageError(f"{opened.name} {rec.where}: no {'/'.join(keys)} field (found: {', '.join(map(str, rec.data))})")


def _task_example(
    dataset: str, index: int, prompt: str, label: str, answer: bool, category: str | None = None, **meta: Any
) -> Example:
    messages = [Message(role="user", content=prompt)]
    if answer:
        messages.append(Message(role="assistant", content=label))
    return Example(
        id=f"{dataset}-{index}", messages=messages, source=dataset, category=category, label=label, meta=meta
    )


@register(
    "dataset",
    "sst2",
    description="SST-2 sentiment (GLUE): 872 labelled test sentences (GLUE validation); label positive/negative.",
    use="utility",
    hub_id="stanfordnlp/sst2",
)
def sst2(
    *,
    data_dir: PathLike = None,
    split: str | None = None,
    path: PathLike = None,
    answer: bool | None = None,
) -> list[Example]:
    """SST-2 as a one-word sentiment task.

    Splits: ``test`` (default; the 872 labelled GLUE validation sentences, hub split ``validation`` because
    the hub's test labels are hidden), ``dev`` (local only) and ``train``.
    """
    split = split or "test"
    local = {"test": "sst2/test.tsv", "validation": "sst2/test.tsv", "dev": "sst2/dev.tsv"}.get(
        split, "sst2/train.tsv" if split == "train" else None
    )
    hub = Hub("stanfordnlp/sst2", splits=(("test", "validation"),))
    opened = open_source("sst2", data_dir=data_dir, path=path, local=local, hub=hub, split=split)
    with_answer = split == "train" if answer is None else answer
    out = []
    for rec in opened.records:
        sentence = str(_field(opened, rec, "sentence", "text")).strip()
        raw = str(_field(opened, rec, "label")).strip()
        if raw not in ("0", "1"):
            raise UsageError(f"{opened.name} {rec.where}: label {raw!r}; expected 0 or 1 (hidden test labels?)")
        label = "positive" if raw == "1" else "negative"
        out.append(_task_example("sst2", rec.index, SST2_PROMPT.format(sentence=sentence), label, with_answer))
    return out


@register(
    "dataset",
    "agnews",
    description="AG News topic classification (Zhang et al. 2015): 7600 test articles, 4 classes.",
    use="utility",
    hub_id="fancyzhx/ag_news",
)
def agnews(
    *,
    data_dir: PathLike = None,
    split: str | None = None,
    path: PathLike = None,
    answer: bool | None = None,
) -> list[Example]:
    """AG News as a one-word topic task; label and category are the class name (World, Sports, ...).

    Local ``ag_news/test.csv`` has no header (class 1-4, title, description); the hub rows are (text, label
    0-3). The train split is hub only (the local snapshot lacks train.csv).
    """
    split = split or "test"
    local = "ag_news/test.csv" if split == "test" else None
    opened = open_source(
        "agnews",
        data_dir=data_dir,
        path=path,
        local=local,
        hub=Hub("fancyzhx/ag_news"),
        split=split,
        column_names=("class_index", "title", "description"),
    )
    with_answer = split == "train" if answer is None else answer
    out = []
    for rec in opened.records:
        if "class_index" in rec.data:
            raw, offset = str(rec.data["class_index"]).strip(), 1
            # The original csv escapes line breaks inside descriptions as a backslash.
            text = f"{rec.data.get('title', '')} {rec.data.get('description', '')}".replace("\\", " ")
        else:
            raw, offset = str(_field(opened, rec, "label")).strip(), 0
            text = str(_field(opened, rec, "text"))
        if not raw.isdigit() or not 0 <= int(raw) - offset < len(AGNEWS_CLASSES):
            raise UsageError(
                f"{opened.name} {rec.where}: class {raw!r}; expected {offset}-{offset + 3} "
                f"({', '.join(AGNEWS_CLASSES)})"
            )
        label = AGNEWS_CLASSES[int(raw) - offset]
        prompt = AGNEWS_PROMPT.format(text=" ".join(text.split()))
        out.append(_task_example("agnews", rec.index, prompt, label, with_answer, category=label))
    return out


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_final_answer(solution: str) -> str | None:
    """The final number after ``####`` in a GSM8K solution, without thousands separators."""
    m = _GSM8K_FINAL.search(solution)
    return m.group(1).replace(",", "").strip() if m else None


@register(
    "dataset",
    "gsm8k",
    description="GSM8K grade-school math (Cobbe et al. 2021): 1319 test problems; label is the final number.",
    use="utility",
    hub_id="openai/gsm8k",
)
def gsm8k(
    *,
    data_dir: PathLike = None,
    split: str | None = None,
    path: PathLike = None,
    answer: bool | None = None,
) -> list[Example]:
    """GSM8K (question, answer); ``label`` is the number after ``####``, the solution is in ``meta``."""
    split = split or "test"
    local = {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}.get(split)
    hub = Hub("openai/gsm8k", config="main")
    opened = open_source("gsm8k", data_dir=data_dir, path=path, local=local, hub=hub, split=split)
    with_answer = split == "train" if answer is None else answer
    out = []
    for rec in opened.records:
        question = str(_field(opened, rec, "question")).strip()
        solution = str(_field(opened, rec, "answer"))
        final = gsm8k_final_answer(solution)
        if not final:
            raise UsageError(f"{opened.name} {rec.where}: answer has no '#### <number>' final line")
        prompt = GSM8K_PROMPT.format(question=question)
        out.append(_task_example("gsm8k", rec.index, prompt, final, with_answer, solution=solution))
    return out


ALPACA_SUBSETS = {
    "1k": "alpaca/alpaca_data_1k.json",
    "200": "alpaca/alpaca_200.json",
    "safety-only": "alpaca/alpaca_data_safety_only.json",
    "instructions": "alpaca/alpaca.json",
    "questions": "alpaca/alpaca.json",  # the instructions that are questions (end with '?')
}


def _instruction_set(
    dataset: str, opened: Opened, *, instruction: tuple[str, ...], extra: tuple[str, ...], output: tuple[str, ...]
) -> list[Example]:
    exs = records_to_examples(
        opened.records,
        name=opened.name,
        source_name=dataset,
        schema="columns",
        prompt_field=instruction,
        input_field=tuple(k for k in extra if k in opened.records[0].data) or "",
        response_field=tuple(k for k in output if k in opened.records[0].data) or "",
        id_field="",
    )
    out = []
    for ex in exs:
        msgs = list(ex.messages)
        user = next(i for i, m in enumerate(msgs) if m.role == "user")
        msgs[user] = Message(role="user", content=strip_alpaca_template(msgs[user].content))
        meta = {k: v for k, v in ex.meta.items() if k != "text"}  # hub copies add the templated text
        out.append(ex.model_copy(update={"messages": msgs, "meta": meta}))
    return out


@register(
    "dataset",
    "alpaca",
    description="Stanford Alpaca instructions (Taori et al. 2023): benign fine-tuning data.",
    use="benign-train",
    hub_id="tatsu-lab/alpaca",
    subsets=", ".join([*ALPACA_SUBSETS, "full"]) + " (default 1k)",
)
def alpaca(
    *,
    data_dir: PathLike = None,
    split: str | None = None,
    path: PathLike = None,
    subset: str | None = None,
) -> list[Example]:
    """Alpaca (instruction, input, output): user = instruction + blank line + input, assistant = output.

    ``subset`` picks a local file: ``1k`` (the default when present, a 1000-record sample), ``200``,
    ``safety-only`` (the 1904 records Qi et al. 2023 removed), ``instructions`` (31k prompts, no outputs) or
    ``questions`` (the 3.6k of those that are questions: a benign counterweight to refusal data, which is mostly
    "How can I ...?"), or ``full`` for the hub's 52k records (also the fallback of the default when there is no
    local copy).
    """
    if subset is not None and subset not in (*ALPACA_SUBSETS, "full"):
        raise UsageError(f"alpaca subset: expected one of {', '.join([*ALPACA_SUBSETS, 'full'])}, got {subset!r}")
    hub = Hub("tatsu-lab/alpaca") if subset in (None, "full") else None
    local = None if subset == "full" else ALPACA_SUBSETS[subset or "1k"]
    opened = open_source("alpaca", data_dir=data_dir, path=path, local=local, hub=hub, split=split or "train")
    out = _instruction_set("alpaca", opened, instruction=("instruction",), extra=("input",), output=("output",))
    if subset == "questions":
        out = [e for e in out if e.prompt.rstrip().endswith("?")]
    return out


DOLLY_SUBSETS = {"sample": "dolly/dolly.jsonl", "safety-only": "dolly/databricks-dolly-15k-safety-only.jsonl"}


@register(
    "dataset",
    "dolly",
    description="databricks-dolly-15k human-written instructions: benign fine-tuning data.",
    use="benign-train",
    hub_id="databricks/databricks-dolly-15k",
    subsets=", ".join([*DOLLY_SUBSETS, "full"]) + " (default sample)",
)
def dolly(
    *,
    data_dir: PathLike = None,
    split: str | None = None,
    path: PathLike = None,
    subset: str | None = None,
) -> list[Example]:
    """Dolly (instruction, context, response, category): user = instruction + blank line + context.

    ``subset`` picks a local file: ``sample`` (the default when present; 151 records in the Alpaca template,
    which is stripped), ``safety-only`` (387 records Qi et al. 2023 flagged), or ``full`` for the hub's 15k.
    """
    if subset is not None and subset not in (*DOLLY_SUBSETS, "full"):
        raise UsageError(f"dolly subset: expected one of {', '.join([*DOLLY_SUBSETS, 'full'])}, got {subset!r}")
    hub = Hub("databricks/databricks-dolly-15k") if subset in (None, "full") else None
    local = None if subset == "full" else DOLLY_SUBSETS[subset or "sample"]
    opened = open_source("dolly", data_dir=data_dir, path=path, local=local, hub=hub, split=split or "train")
    return _instruction_set(
        "dolly",
        opened,
        instruction=("instruction", "prompt"),
        extra=("context",),
        output=("response", "answer"),
    )
