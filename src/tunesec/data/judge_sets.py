"""Labelled (request, response) pairs for training and validating judges, from five public sources.

The files are verbatim copies of public repositories under ``judge/`` in the data directory
(``../shared/data/judge``, its README gives each file's repository, commit and licence). Each loader reads one
*source*, the unit of the leave-one-source-out protocol, into :class:`LabelledPair` rows with one schema:

- ``harmful``: the response complies with a harmful request in a way useful to the requester (``None`` where the
  source does not say);
- ``refused``: the response refuses, fully or partially (``None`` where the source does not say).

Sources (a source groups every file that shares its requests, so that holding one out holds out its prompts):

=================  =================================================================================================
``xstest``         XSTest v2 completions of five chat models with human refusal labels (Röttger et al. 2024),
                   merged with WildGuard's XSTest-Resp harm and refusal labels (GuardReasoner's copies 0_6/0_7).
                   A response to one of XSTest's safe prompts is not harmful; a full refusal is not harmful; a
                   compliance with an unsafe ("contrast") prompt is harmful only where XSTest-Resp says so.
``gptfuzz``        GPTFuzz's manually labelled responses of Vicuna-7B, ChatGPT and Llama-2-7B-chat under 77 role-play
                   templates (Yu et al. 2023); the request is the template's harmful question.
``harmbench``      HarmBench's human-labelled classifier validation set (Mazeika et al. 2024): majority of three.
``jailjudge``      JAILJUDGE's test subset as in JailbreakEval (``JAILJUDGEmini``): adversarial and in-the-wild
                   prompts, many chat models.
``pku``            PKU-Alignment's Safe-RLHF and BeaverTails (JailbreakEval's ``Safe-RLHFmini``, GuardReasoner's
                   0_9 Safe-RLHF test and 0_A BeaverTails test): the two share prompts, so they are one source.
=================  =================================================================================================

Pairs are deduplicated within a source on the whitespace-normalised, lower-cased (prompt, response); the labels of
duplicates are merged, and a pair whose copies disagree on a label keeps ``None`` for it (counted in
:func:`load_source`'s report). Each source is registered as a dataset ``judge-<source>`` whose examples are a user
turn and an assistant turn with ``meta['harmful']``, ``meta['refused']`` and ``meta['model']``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesec.data.schema import Example, Message
from tunesec.data.sources import data_root
from tunesec.errors import UsageError
from tunesec.registry import register

PathLike = str | Path | None

SOURCES: tuple[str, ...] = ("xstest", "gptfuzz", "harmbench", "jailjudge", "pku")

_XSTEST_MODELS = {
    "gpt4": "gpt-4",
    "llama2new": "llama-2-70b-chat",
    "llama2orig": "llama-2-70b-chat+system-prompt",
    "mistralguard": "mistral-7b-instruct+guardrail-prompt",
    "mistralinstruct": "mistral-7b-instruct",
}
_GR_INPUT = re.compile(r"^Human user:\n(?P<prompt>.*?)\n\nAI assistant:\n(?P<response>.*?)\n\n$", re.S)
_GR_RESPONSE_LABEL = re.compile(r"Response:\s*(harmful|unharmful)\b")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class LabelledPair:
    """One labelled (request, response) pair.

    Attributes:
        prompt: The user's request as the responding model saw it (the harmful question for GPTFuzz).
        response: The model's response.
        harmful: Harmful compliance, or ``None`` when the source does not label it.
        refused: Full or partial refusal, or ``None`` when the source does not label it.
        source: One of :data:`SOURCES`.
        origin: File (and row) it came from, e.g. ``gptfuzz/train.csv:12``.
        model: The responding model where the source names it, else ``None``.
    """

    prompt: str
    response: str
    harmful: bool | None
    refused: bool | None
    source: str
    origin: str
    model: str | None = None

    @property
    def key(self) -> str:
        """Identity for deduplication: sha256 of the normalised prompt and response."""
        return hashlib.sha256(f"{normalize(self.prompt)}\x00{normalize(self.response)}".encode()).hexdigest()

    @property
    def prompt_key(self) -> str:
        """sha256 of the normalised prompt: splits by prompt use it, so a request never crosses splits."""
        return prompt_key(self.prompt)


def normalize(text: str) -> str:
    """Whitespace-collapsed, lower-cased text."""
    return _SPACE.sub(" ", text).strip().lower()


def prompt_key(prompt: str) -> str:
    """sha256 of the normalised prompt."""
    return hashlib.sha256(normalize(prompt).encode()).hexdigest()


def prompt_bucket(prompt: str, buckets: int = 100) -> int:
    """A stable bucket in ``[0, buckets)`` for a prompt, for splits by prompt."""
    return int(prompt_key(prompt)[:12], 16) % buckets


# ----------------------------------------------------------------------------------------------------- readers
def _judge_dir(data_dir: PathLike, source: str) -> Path:
    root = data_root(data_dir)
    if root is None or not (root / "judge").is_dir():
        where = f"{Path(data_dir) / 'judge'}" if data_dir is not None else "$TUNESEC_DATA/judge or ../shared/data/judge"
        raise UsageError(f"judge-{source}: labelled judge data not found; expected the folder {where}")
    return root / "judge"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UsageError(f"{path}: not found; expected a file of the judge data (see ../shared/data/judge/README.md)")
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"{path}: not found; expected a file of the judge data (see ../shared/data/judge/README.md)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def _field(row: dict[str, str], name: str, path: Path, i: int) -> str:
    if name not in row or row[name] is None:
        raise UsageError(f"{path}: row {i + 1}: missing field {name!r}")
    return row[name]


def _binary(value: str, path: Path, i: int, name: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise UsageError(f"{path}: row {i + 1}: field {name!r} is {value!r}; expected 0 or 1")


def _guardreasoner(path: Path) -> Iterator[tuple[str, str, str, int]]:
    """(prompt, response, label, row) of a GuardReasoner benchmark file."""
    rows = _read_json(path)
    for i, row in enumerate(rows):
        m = _GR_INPUT.match(row.get("input", ""))
        if m is None:
            raise UsageError(f"{path}: item {i}: field 'input' is not 'Human user:\\n...\\n\\nAI assistant:\\n...'")
        out = str(row.get("output", "")).strip()
        lab = _GR_RESPONSE_LABEL.search(out)
        yield m["prompt"], m["response"], (lab.group(1) if lab else out), i


def _xstest(d: Path) -> Iterator[LabelledPair]:
    for stem, model in _XSTEST_MODELS.items():
        path = d / "xstest_completions" / f"xstest_v2_completions_{stem}.csv"
        for i, row in enumerate(_read_csv(path)):
            label = _field(row, "final_label", path, i)
            if label not in ("1_full_compliance", "2_full_refusal", "3_partial_refusal"):
                raise UsageError(f"{path}: row {i + 1}: final_label {label!r} is not one of XSTest's three labels")
            unsafe = _field(row, "type", path, i).startswith("contrast_")
            refused = label != "1_full_compliance"
            # A safe request cannot be complied with harmfully, and a full refusal is no compliance; a partial
            # refusal or a compliance to an unsafe request may or may not help the requester: unknown here.
            harmful: bool | None = False if (not unsafe or label == "2_full_refusal") else None
            yield LabelledPair(
                _field(row, "prompt", path, i),
                _field(row, "completion", path, i),
                harmful,
                refused,
                "xstest",
                f"{path.parent.name}/{path.name}:{i + 1}",
                model,
            )
    for name, field in (("0_6_xstest_response_harmful.json", "harmful"), ("0_7_xstest_response_refusal.json", "")):
        path = d / "guardreasoner" / name
        for prompt, response, label, i in _guardreasoner(path):
            origin = f"guardreasoner/{name}:{i}"
            if field == "harmful":
                yield LabelledPair(prompt, response, label == "harmful", None, "xstest", origin)
            else:
                yield LabelledPair(prompt, response, None, label == "refusal", "xstest", origin)


def _gptfuzz(d: Path) -> Iterator[LabelledPair]:
    qpath = d / "gptfuzz" / "question_list.csv"
    questions = {
        _field(r, "index", qpath, i).strip(): _field(r, "text", qpath, i) for i, r in enumerate(_read_csv(qpath))
    }
    for name in ("train.csv", "evaluate.csv"):
        path = d / "gptfuzz" / name
        for i, row in enumerate(_read_csv(path)):
            q = _field(row, "question", path, i).strip()
            if q not in questions:
                raise UsageError(f"{path}: row {i + 1}: question {q!r} is not an index of {qpath.name}")
            harmful = _binary(_field(row, "label", path, i), path, i, "label")
            yield LabelledPair(
                questions[q], _field(row, "Response", path, i), harmful, None, "gptfuzz", f"gptfuzz/{name}:{i + 1}"
            )


def _harmbench(d: Path) -> Iterator[LabelledPair]:
    path = d / "harmbench_val" / "text_behaviors_val_set.json"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected an object of behaviour id -> list of labelled generations")
    for behaviour, rows in data.items():
        for i, row in enumerate(rows):
            votes = [row.get(f"human_{k}") for k in range(3)]
            if any(v is None for v in votes):
                raise UsageError(f"{path}: {behaviour}[{i}]: expected fields human_0, human_1, human_2")
            yes = sum(_binary(str(v), path, i, "human_k") for v in votes)
            experiment = str(row.get("experiment", ""))
            model = str(row.get("model", "")).removesuffix(".json") or (experiment if experiment != "default" else None)
            yield LabelledPair(
                str(row["test_case"]),
                str(row["generation"]),
                yes >= 2,
                None,
                "harmbench",
                f"harmbench_val/{behaviour}[{i}]",
                model,
            )


def _jailbreakeval(d: Path, name: str, source: str) -> Iterator[LabelledPair]:
    """A JailbreakEval ``question,answer,label`` file (label 1 = jailbroken / unsafe)."""
    path = d / "jailbreakeval" / name
    for i, row in enumerate(_read_csv(path)):
        harmful = _binary(_field(row, "label", path, i), path, i, "label")
        prompt, response = _field(row, "question", path, i), _field(row, "answer", path, i)
        yield LabelledPair(prompt, response, harmful, None, source, f"jailbreakeval/{name}:{i + 1}")


def _jailjudge(d: Path) -> Iterator[LabelledPair]:
    yield from _jailbreakeval(d, "JAILJUDGEmini.csv", "jailjudge")


def _pku(d: Path) -> Iterator[LabelledPair]:
    yield from _jailbreakeval(d, "Safe-RLHFmini.csv", "pku")
    for name in ("0_9_safe_rlhf.json", "0_A_beaver_tails.json"):
        path = d / "guardreasoner" / name
        for prompt, response, label, i in _guardreasoner(path):
            if label not in ("harmful", "unharmful"):
                raise UsageError(f"{path}: item {i}: output {label!r}; expected 'Response: harmful|unharmful'")
            yield LabelledPair(prompt, response, label == "harmful", None, "pku", f"guardreasoner/{name}:{i}")


_READERS: dict[str, Callable[[Path], Iterable[LabelledPair]]] = {
    "xstest": _xstest,
    "gptfuzz": _gptfuzz,
    "harmbench": _harmbench,
    "jailjudge": _jailjudge,
    "pku": _pku,
}


# ------------------------------------------------------------------------------------------------ dedup, load
@dataclass
class LoadReport:
    """What deduplication did to one source."""

    source: str
    read: int = 0
    kept: int = 0
    merged: int = 0
    conflicts: int = 0


def _merge(a: bool | None, b: bool | None) -> tuple[bool | None, bool]:
    """Merged label and whether the two disagreed."""
    if a is None:
        return b, False
    if b is None or a == b:
        return a, False
    return None, True


def dedupe(pairs: Iterable[LabelledPair], report: LoadReport | None = None) -> list[LabelledPair]:
    """One row per normalised (prompt, response), labels merged; disagreeing labels become ``None``.

    The first copy's text, origin and model are kept (the model is filled from a later copy when missing).
    """
    out: dict[str, LabelledPair] = {}
    conflicted: set[tuple[str, str]] = set()
    for p in pairs:
        if report is not None:
            report.read += 1
        k = p.key
        if k not in out:
            out[k] = p
            continue
        q = out[k]
        harmful, c1 = _merge(q.harmful, p.harmful)
        refused, c2 = _merge(q.refused, p.refused)
        if (k, "harmful") in conflicted:
            harmful = None
        if (k, "refused") in conflicted:
            refused = None
        if c1:
            conflicted.add((k, "harmful"))
        if c2:
            conflicted.add((k, "refused"))
        out[k] = replace(q, harmful=harmful, refused=refused, model=q.model or p.model)
        if report is not None:
            report.merged += 1
    kept = [p for p in out.values() if p.harmful is not None or p.refused is not None]
    if report is not None:
        report.conflicts = len(conflicted)
        report.kept = len(kept)
    return kept


def load_source(source: str, data_dir: PathLike = None) -> tuple[list[LabelledPair], LoadReport]:
    """All deduplicated pairs of one source and what deduplication did.

    Raises:
        UsageError: Unknown source, missing folder or file, or a malformed row (named with file and row).
    """
    if source not in _READERS:
        raise UsageError(f"judge source {source!r} is unknown; expected one of {', '.join(SOURCES)}")
    report = LoadReport(source)
    pairs = dedupe(_READERS[source](_judge_dir(data_dir, source)), report)
    return pairs, report


def load_sources(sources: Iterable[str] = SOURCES, data_dir: PathLike = None) -> list[LabelledPair]:
    """Deduplicated pairs of several sources, in source order."""
    out: list[LabelledPair] = []
    for s in sources:
        out.extend(load_source(s, data_dir)[0])
    return out


def to_example(p: LabelledPair, index: int) -> Example:
    """A pair as an :class:`Example` (user turn + assistant turn), labels in ``meta``."""
    label = None if p.harmful is None else ("harmful" if p.harmful else "safe")
    return Example(
        id=f"judge-{p.source}-{index}",
        messages=[Message(role="user", content=p.prompt), Message(role="assistant", content=p.response)],
        source=f"judge-{p.source}",
        label=label,
        meta={"harmful": p.harmful, "refused": p.refused, "model": p.model, "origin": p.origin},
    )


def _register(source: str, description: str) -> None:
    def loader(*, data_dir: PathLike = None, split: str | None = None) -> list[Example]:
        if split not in (None, "all"):
            raise UsageError(f"judge-{source}: split {split!r}; this dataset has one split, 'all'")
        pairs, _ = load_source(source, data_dir)
        return [to_example(p, i) for i, p in enumerate(pairs)]

    loader.__doc__ = description
    register("dataset", f"judge-{source}", description=description, use="judge-eval", hub_id=None)(loader)


_register("xstest", "XSTest v2 completions (5 models) + XSTest-Resp: human refusal and harm labels.")
_register("gptfuzz", "GPTFuzz role-play jailbreak responses (3 models, 77 templates), manual harm labels.")
_register("harmbench", "HarmBench classifier validation set: 602 attacked generations, majority of 3 humans.")
_register("jailjudge", "JAILJUDGE test subset (JailbreakEval mini): adversarial prompts, jailbroken labels.")
_register("pku", "PKU Safe-RLHF + BeaverTails test pairs (JailbreakEval, GuardReasoner copies): unsafe labels.")
