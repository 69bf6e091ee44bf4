"""Score a file of (prompt, response) pairs with a judge, and check the judge against labels in the file.

The Python side of ``tunesec judge FILE``: :func:`read_pairs` reads JSONL/JSON/CSV/TSV/parquet rows and checks
them (every bad row is one :class:`~tunesec.errors.UsageError` naming the file, the row and the field),
:func:`judge_file` scores them and, with a label field, measures agreement (:mod:`tunesec.evals.agreement`) and
lists the mismatches. With ``out``, writes into a new folder: ``scores.jsonl`` (one line per row),
``agreement.json`` and ``mismatches.jsonl`` (with labels) and ``summary.json``; existing files are never replaced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunesec.data.readers import read_records
from tunesec.errors import UsageError
from tunesec.evals.agreement import Agreement, agreement
from tunesec.judges.base import Judge, JudgeInput, Score
from tunesec.store.atomic import atomic_write_json, atomic_write_text

LabelKind = Literal["harmful", "refused"]
MAX_CHARS = 32_000
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


@dataclass(frozen=True)
class FilePair:
    """One row of the file: where it is, what is judged and its label (if any)."""

    where: str
    prompt: str
    response: str
    label: bool | None = None
    id: str | None = None


@dataclass
class JudgeFileResult:
    """Scores of every row, and agreement with the labels when the file has them."""

    pairs: list[FilePair]
    scores: list[Score]
    label_kind: LabelKind
    agreement: Agreement | None = None
    mismatches: list[int] = field(default_factory=list)

    def predicted(self, score: Score) -> bool | None:
        """The judge's decision for the label kind (``None`` when unparsed)."""
        if score.unparsed:
            return None
        return score.harmful if self.label_kind == "harmful" else score.refused

    def probability(self, score: Score) -> float | None:
        """The judge's probability for the label kind, when it gives one."""
        d = score.detail
        if self.label_kind == "harmful":
            return d.get("p_harmful", score.score)
        return d.get("p_refused")


def parse_label(value: Any, where: str, name: str) -> bool:
    """A 0/1/true/false label (bool, int or string) as a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{where}: field {name!r} is {str(value)[:40]!r}; expected 0, 1, true or false")


def read_pairs(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    label_field: str | None = None,
    max_chars: int = MAX_CHARS,
) -> list[FilePair]:
    """Checked rows of a file (jsonl, json, csv, tsv, parquet).

    Raises:
        UsageError: unreadable file, not UTF-8, a row without the prompt or response field, an empty or over-long
            response (more than ``max_chars`` characters), a label that is not 0/1/true/false.
    """
    name, records = read_records(path)
    out: list[FilePair] = []
    for rec in records:
        where = f"{name} {rec.where}"
        row = rec.data
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected an object with fields {prompt_field!r} and {response_field!r}")
        values = []
        for f in (prompt_field, response_field):
            if f not in row or row[f] is None:
                raise UsageError(
                    f"{where}: missing field {f!r}; expected a string (see --prompt-field/--response-field)"
                )
            if not isinstance(row[f], str):
                raise UsageError(f"{where}: field {f!r} is a {type(row[f]).__name__}; expected a string")
            values.append(row[f])
        prompt, response = values
        if not response.strip():
            raise UsageError(f"{where}: field {response_field!r} is empty; expected the response to judge")
        if len(response) > max_chars or len(prompt) > max_chars:
            f, n = (response_field, len(response)) if len(response) > max_chars else (prompt_field, len(prompt))
            raise UsageError(f"{where}: field {f!r} has {n} characters; expected at most {max_chars} (--max-chars)")
        label = None
        if label_field is not None:
            if label_field not in row:
                raise UsageError(f"{where}: missing label field {label_field!r}; expected 0, 1, true or false")
            label = parse_label(row[label_field], where, label_field)
        rid = row.get("id")
        out.append(FilePair(where, prompt, response, label, None if rid is None else str(rid)))
    return out


def judge_file(
    path: str | Path,
    judge: Judge,
    *,
    label_field: str | None = None,
    label_kind: LabelKind = "harmful",
    prompt_field: str = "prompt",
    response_field: str = "response",
    max_chars: int = MAX_CHARS,
    out: str | Path | None = None,
    batch: int = 64,
    progress: Any = None,
) -> JudgeFileResult:
    """Score every row of ``path`` with ``judge``; with ``label_field``, measure agreement and find mismatches.

    Args:
        path: The file of pairs.
        judge: Any judge (``tunesec.judges.get_judge(name)``).
        label_field: Field holding 0/1/true/false labels, or ``None``.
        label_kind: What the labels say: ``harmful`` (harmful compliance) or ``refused``.
        prompt_field: Field of the request.
        response_field: Field of the response.
        max_chars: Longest accepted prompt or response, in characters.
        out: New or empty folder for the outputs; ``None`` writes nothing.
        batch: Pairs per judge call.
        progress: Optional callable ``progress(done, total)``.

    Raises:
        UsageError: bad rows (see :func:`read_pairs`), ``out`` not empty, unknown label kind.
    """
    if label_kind not in ("harmful", "refused"):
        raise UsageError(f"--label-kind {label_kind!r}: expected harmful or refused")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir}: exists and is not an empty folder; expected a new or empty output folder")
    pairs = read_pairs(
        path, prompt_field=prompt_field, response_field=response_field, label_field=label_field, max_chars=max_chars
    )
    scores: list[Score] = []
    for s in range(0, len(pairs), batch):
        part = pairs[s : s + batch]
        scores.extend(judge.score([JudgeInput(prompt=p.prompt, response=p.response, id=p.id) for p in part]))
        if progress is not None:
            progress(len(scores), len(pairs))
    result = JudgeFileResult(pairs, scores, label_kind)
    if label_field is not None:
        preds = [result.predicted(s) for s in scores]
        probs = [result.probability(s) for s in scores]
        labels = [bool(p.label) for p in pairs]
        if any(p is not None for p in preds):
            result.agreement = agreement(labels, preds, probs if all(p is not None for p in probs) else None)
        result.mismatches = [i for i, (y, p) in enumerate(zip(labels, preds, strict=True)) if p is None or p != y]
    if out_dir is not None:
        _write(out_dir, result, judge, str(path), label_field)
    return result


def _row(p: FilePair, s: Score) -> dict[str, Any]:
    return {
        "where": p.where,
        "id": p.id,
        "harmful": s.harmful,
        "refused": s.refused,
        "score": s.score,
        "unparsed": s.unparsed,
        "label": p.label,
        "detail": s.detail,
    }


def _lines(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def _write(out: Path, result: JudgeFileResult, judge: Judge, source: str, label_field: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "scores.jsonl", _lines([_row(p, s) for p, s in zip(result.pairs, result.scores, strict=True)])
    )
    summary: dict[str, Any] = {
        "file": source,
        "judge": judge.spec(),
        "rows": len(result.pairs),
        "harmful": sum(bool(s.harmful) for s in result.scores),
        "refused": sum(bool(s.refused) for s in result.scores),
        "unparsed": sum(s.unparsed for s in result.scores),
        "label_field": label_field,
        "label_kind": result.label_kind if label_field else None,
    }
    if result.agreement is not None:
        atomic_write_json(out / "agreement.json", result.agreement.to_dict())
        mism = [
            {
                **_row(result.pairs[i], result.scores[i]),
                "prompt": result.pairs[i].prompt,
                "response": result.pairs[i].response,
            }
            for i in result.mismatches
        ]
        atomic_write_text(out / "mismatches.jsonl", _lines(mism))
        summary["mismatches"] = len(mism)
    atomic_write_json(out / "summary.json", summary)
