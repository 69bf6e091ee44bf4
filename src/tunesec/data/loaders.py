"""Load chat examples from files (csv, tsv, json, jsonl, parquet) or Hugging Face ``datasets``.

Every source becomes a list of :class:`~tunesec.data.schema.Example`. Two things are detected separately:

* the **file format** (``format``): from the extension (``.csv``, ``.tsv``, ``.json``, ``.jsonl``/``.ndjson``,
  ``.parquet``), a directory written by ``Dataset.save_to_disk`` or any other directory/hub id, which goes to
  ``datasets.load_dataset`` (``format="hf"``);
* the **record schema** (``schema``): OpenAI chat format (``{"messages": [{"role", "content"}, ...]}``;
  ShareGPT ``conversations`` with ``from``/``value`` is accepted too), Alpaca (``instruction``/``input``/
  ``output``) or generic columns (a prompt column, optionally a response, category, label, id and system
  column). The schema is detected from the first record's keys unless given.

Reading files is :mod:`tunesec.data.readers`. Bad input raises :class:`~tunesec.errors.UsageError` with one
line that names the file, the line (jsonl, csv) or item (json, parquet, hub rows) and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tunesec.data.readers import FILE_FORMATS, Record, detect_format, read_records
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError

__all__ = [
    "FILE_FORMATS",
    "SCHEMAS",
    "Record",
    "detect_format",
    "detect_schema",
    "iter_jsonl",
    "load_examples",
    "read_records",
    "records_to_examples",
    "strip_alpaca_template",
]

Schema = Literal["chat", "alpaca", "columns"]
Field = str | Sequence[str] | None

SCHEMAS: tuple[str, ...] = ("chat", "alpaca", "columns")

# Column names tried, in order, when a field is not given. Matching is exact first, then case-insensitive.
# AdvBench's "target" is deliberately absent from RESPONSE_COLUMNS: it is a GCG target prefix, not a response.
PROMPT_COLUMNS = (
    "prompt",
    "goal",
    "forbidden_prompt",
    "behavior",
    "instruction",
    "question",
    "query",
    "request",
    "sentence",
    "text",
)
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
CATEGORY_COLUMNS = ("category",)
LABEL_COLUMNS = ("label",)
ID_COLUMNS = ("id",)
SYSTEM_COLUMNS = ("system", "system_prompt")
ALPACA_INPUT_COLUMNS = ("input", "context")
ALPACA_OUTPUT_COLUMNS = ("output", "response")

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system", "model": "assistant", "bot": "assistant"}


# ------------------------------------------------------------------------------------------------ converting
def _columns(data: Mapping[str, Any]) -> str:
    return ", ".join(map(str, data)) or "(none)"


def _find_column(keys: Sequence[str], candidates: Sequence[str]) -> str | None:
    for c in candidates:
        if c in keys:
            return c
    lower = {k.lower(): k for k in keys if isinstance(k, str)}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def _resolve(
    keys: Sequence[str], given: Field, defaults: Sequence[str], name: str, what: str, *, required: bool
) -> str | None:
    """The column for one field: the given name(s), else the first default present; ``""`` disables it."""
    if given == "":
        return None
    if given is None:
        col = _find_column(keys, defaults)
        if col is None and required:
            raise UsageError(
                f"{name}: no {what} column; expected one of {'/'.join(defaults)} or pass {what}_field= "
                f"(found: {', '.join(keys) or '(none)'})"
            )
        return col
    candidates = [given] if isinstance(given, str) else list(given)
    col = _find_column(keys, candidates)
    if col is None:
        shown = candidates[0] if len(candidates) == 1 else "/".join(candidates)
        raise UsageError(f"{name}: no column {shown!r} ({what}_field); found: {', '.join(keys) or '(none)'}")
    return col


def detect_schema(first: Mapping[str, Any]) -> str:
    """``"chat"``, ``"alpaca"`` or ``"columns"`` from one record's keys."""
    if "messages" in first or "conversations" in first:
        return "chat"
    if "instruction" in first and any(k in first for k in (*ALPACA_INPUT_COLUMNS, *ALPACA_OUTPUT_COLUMNS)):
        return "alpaca"
    return "columns"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return ""
    return value if isinstance(value, str) else str(value)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _chat_messages(data: Mapping[str, Any], name: str, where: str) -> list[Message]:
    raw = data.get("messages", data.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{name} {where}: 'messages' must be a non-empty list of {{role, content}} objects")
    messages: list[Message] = []
    for j, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise UsageError(f"{name} {where}: message {j} is not an object; expected {{role, content}}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = _SHAREGPT_ROLES.get(str(role).lower(), role) if "from" in m and "role" not in m else role
        if role not in ("system", "user", "assistant"):
            raise UsageError(f"{name} {where}: message {j} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise UsageError(f"{name} {where}: message {j} has no text 'content'")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool) or (weight == 0 and role != "assistant"):
            raise UsageError(f"{name} {where}: message {j} has weight {weight!r}; expected 0 or 1 on an assistant turn")
        messages.append(Message(role=role, content=content, weight=int(weight)))
    if not any(m.role == "user" for m in messages):
        raise UsageError(f"{name} {where}: chat has no user turn; expected at least one message with role 'user'")
    return messages


def records_to_examples(
    records: Sequence[Record],
    *,
    name: str,
    source_name: str,
    schema: str | None = None,
    prompt_field: Field = None,
    response_field: Field = None,
    input_field: Field = None,
    category_field: Field = None,
    label_field: Field = None,
    id_field: Field = None,
    system_field: Field = None,
) -> list[Example]:
    """Convert raw records into examples (see :func:`load_examples` for the fields).

    Raises:
        UsageError: missing columns, an empty prompt, a chat without a user turn, a duplicate id.
    """
    if not records:
        return []
    first = records[0].data
    sch = schema or detect_schema(first)
    if sch == "openai":
        sch = "chat"
    if sch not in SCHEMAS:
        raise UsageError(f"{name}: unknown schema {sch!r}; expected one of {', '.join(SCHEMAS)}")
    # Optional fields may appear only in some records (json/jsonl), so columns resolve against all keys.
    keys: list[str] = []
    for rec in records:
        if isinstance(rec.data, Mapping):
            keys.extend(k for k in rec.data if isinstance(k, str) and k not in keys)
    cols: dict[str, str | None] = {}
    if sch == "chat":
        if "messages" not in first and "conversations" not in first:
            raise UsageError(f"{name}: no 'messages' field for the chat schema (found: {_columns(first)})")
        cols["prompt"] = cols["response"] = cols["input"] = None
    elif sch == "alpaca":
        cols["prompt"] = _resolve(keys, prompt_field, ("instruction",), name, "prompt", required=True)
        cols["input"] = _resolve(keys, input_field, ALPACA_INPUT_COLUMNS, name, "input", required=False)
        cols["response"] = _resolve(keys, response_field, ALPACA_OUTPUT_COLUMNS, name, "response", required=False)
    else:
        cols["prompt"] = _resolve(keys, prompt_field, PROMPT_COLUMNS, name, "prompt", required=True)
        cols["input"] = _resolve(keys, input_field, (), name, "input", required=False)
        cols["response"] = _resolve(keys, response_field, RESPONSE_COLUMNS, name, "response", required=False)
    cols["category"] = _resolve(keys, category_field, CATEGORY_COLUMNS, name, "category", required=False)
    cols["label"] = _resolve(keys, label_field, LABEL_COLUMNS, name, "label", required=False)
    cols["id"] = _resolve(keys, id_field, ID_COLUMNS, name, "id", required=False)
    cols["system"] = _resolve(keys, system_field, SYSTEM_COLUMNS, name, "system", required=False)
    used = {c for c in cols.values() if c is not None} | {"messages", "conversations"}

    examples: list[Example] = []
    seen: dict[str, str] = {}
    for rec in records:
        data = rec.data
        if not isinstance(data, Mapping):
            raise UsageError(f"{name} {rec.where}: expected an object")
        if sch == "chat":
            messages = _chat_messages(data, name, rec.where)
        else:
            prompt_col = cols["prompt"]
            assert prompt_col is not None
            if prompt_col not in data:
                raise UsageError(
                    f"{name} {rec.where}: no {prompt_col!r} field; expected the fields of the first record"
                )
            prompt = _text(data.get(prompt_col)).strip()
            if not prompt:
                raise UsageError(f"{name} {rec.where}: empty {prompt_col!r}; expected the prompt text")
            extra = _text(data.get(cols["input"])).strip() if cols["input"] else ""
            if extra:
                prompt = f"{prompt}\n\n{extra}"
            messages = []
            system = _text(data.get(cols["system"])).strip() if cols["system"] else ""
            if system:
                messages.append(Message(role="system", content=system))
            messages.append(Message(role="user", content=prompt))
            response = _text(data.get(cols["response"])) if cols["response"] else ""
            if response.strip():
                messages.append(Message(role="assistant", content=response))
        raw_id = _text(data.get(cols["id"])).strip() if cols["id"] else ""
        ex_id = raw_id or f"{source_name}-{rec.index}"
        if ex_id in seen:
            raise UsageError(
                f"{name} {rec.where}: duplicate id {ex_id!r} (first at {seen[ex_id]}); ids must be unique, "
                "pass id_field='' to number rows instead"
            )
        seen[ex_id] = rec.where
        category = _text(data.get(cols["category"])).strip() if cols["category"] else ""
        label = _text(data.get(cols["label"])).strip() if cols["label"] else ""
        meta = {str(k): _jsonable(v) for k, v in data.items() if k not in used}
        examples.append(
            Example(
                id=ex_id,
                messages=messages,
                source=source_name,
                category=category or None,
                label=label or None,
                meta=meta,
            )
        )
    return examples


def _source_name(source: str | Path, fmt: str) -> str:
    path = Path(source)
    if fmt == "hf" and not path.exists():
        return str(source).rstrip("/").split("/")[-1]
    return path.stem if path.is_file() else path.name


def load_examples(
    source: str | Path,
    *,
    format: str | None = None,
    schema: str | None = None,
    prompt_field: Field = None,
    response_field: Field = None,
    input_field: Field = None,
    category_field: Field = None,
    label_field: Field = None,
    id_field: Field = None,
    system_field: Field = None,
    split: str | None = None,
    config: str | None = None,
    column_names: Sequence[str] | None = None,
    source_name: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load a file, a saved ``datasets`` directory or a hub dataset into examples.

    Field arguments take a column name, a sequence of names (the first present is used), ``None`` to
    auto-detect from common names, or ``""`` to ignore the field. Columns not used end up in ``meta``.

    Args:
        source: Path of a csv/tsv/json/jsonl/parquet file, a dataset directory, or a hub id.
        format: File format (``csv, tsv, json, jsonl, parquet, hf``); detected from the extension when None.
            A record layout name (``chat``, ``openai``, ``alpaca``, ``columns``) is taken as ``schema``.
        schema: Record layout (``chat``, ``alpaca``, ``columns``); detected from the first record when None.
        prompt_field: Prompt column (default: the first of prompt, goal, forbidden_prompt, behavior,
            instruction, question, query, request, sentence, text).
        response_field: Response column, learned as the assistant turn (default: response, output, answer,
            completion; Alpaca: output, response).
        input_field: Extra input appended to the prompt after a blank line (Alpaca default: input, context).
        category_field: Category column (default: category).
        label_field: Label column (default: label).
        id_field: Id column (default: id); without one, ids are ``<source name>-<row index>``.
        system_field: System prompt column (default: system, system_prompt).
        split: Split of a ``datasets`` source (default: the only split, else ``train``).
        config: Hub dataset configuration name.
        column_names: Column names of a csv/tsv file that has no header row.
        source_name: Name stored in ``Example.source`` and used in ids (default: the file stem or the
            dataset name).
        limit: Keep only the first ``limit`` examples (for a seeded, category-balanced sample use
            :func:`tunesec.data.named.sample_examples`).

    Returns:
        The examples, in file order.

    Raises:
        UsageError: one line naming the file (and line/item) and what was expected.
    """
    if limit is not None and limit < 0:
        raise UsageError(f"limit: expected a non-negative integer, got {limit}")
    if format in (*SCHEMAS, "openai"):  # format="chat"/"alpaca"/... names the record layout
        if schema is not None and schema != format:
            raise UsageError(f"{source}: format={format!r} and schema={schema!r} disagree")
        schema, format = format, None
    fmt = format or detect_format(source)
    name, records = read_records(source, format=fmt, split=split, config=config, column_names=column_names)
    if limit is not None:
        records = records[:limit]
    return records_to_examples(
        records,
        name=name,
        source_name=source_name or _source_name(source, fmt),
        schema=schema,
        prompt_field=prompt_field,
        response_field=response_field,
        input_field=input_field,
        category_field=category_field,
        label_field=label_field,
        id_field=id_field,
        system_field=system_field,
    )


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Objects of a jsonl file, with the same error messages as :func:`load_examples`."""
    for rec in read_records(path, format="jsonl")[1]:
        yield rec.data


_ALPACA_TEMPLATE = re.compile(
    r"^\s*Below is an instruction that describes a task.*?### Instruction:\s*\n(?P<instruction>.*?)"
    r"(?:\n\s*### Input:\s*\n(?P<input>.*?))?\s*\n\s*### Response:\s*$",
    re.DOTALL,
)


def strip_alpaca_template(text: str) -> str:
    """The bare instruction (plus input after a blank line) from a prompt wrapped in the Alpaca template.

    Text that is not in the template is returned unchanged.
    """
    m = _ALPACA_TEMPLATE.match(text)
    if m is None:
        return text
    instruction = m.group("instruction").strip()
    extra = (m.group("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction
