"""Tokenisation with loss on assistant tokens only, and the collators (padding-free packing or padded).

Assistant spans are found by rendering the chat prefix with the chat formatter: for each assistant turn ``i`` the
text ``render(messages[:i], add_generation_prompt=True)`` ends where the turn's content starts and
``render(messages[:i+1])`` ends where the turn (with its end-of-turn marker) ends. A turn's ``loss_start``
(:class:`tunesec.data.schema.Message`) moves its span's start past that many characters of its content (a turn of
``weight`` 0 gets no span). The full chat is tokenised once with character offsets, and a token is labelled when it
starts inside an assistant span. This works for multi-turn chats and any template whose renderings of a prefix are
prefixes of the full rendering; templates that rewrite earlier turns (e.g. strip reasoning) fall back to locating
the turn's text in the full rendering.

torch is imported inside the collators only, so this module stays cheap to import.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunesec.data.schema import Example
from tunesec.errors import UsageError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100

RenderFn = Callable[[list[dict[str, str]], bool], str]


@dataclass(frozen=True)
class Encoded:
    """One tokenised training example: token ids and labels (``-100`` where no loss is taken)."""

    example_id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_label_tokens(self) -> int:
        """Tokens that carry a loss."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def chat_renderer(tokenizer: Any) -> RenderFn:
    """A function ``render(messages, add_generation_prompt) -> str`` for ``tokenizer``.

    Uses the project's sandboxed :class:`tunesec.models.chat.ChatFormatter` (the tokenizer's template, or
    the project's fallback template when it has none), so training and generation format chats alike.
    """
    from tunesec.models.chat import ChatFormatter

    formatter = ChatFormatter(tokenizer)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return formatter.render(messages, add_generation_prompt=add_generation_prompt)

    return render


def assistant_char_spans(example: Example, render: RenderFn) -> tuple[str, list[tuple[int, int]]]:
    """Render ``example`` and return the text and the character spans of its assistant turns."""
    chat = example.chat()
    full = render(chat, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(chat):
        if msg["role"] != "assistant":
            continue
        before = render(chat[:i], True)
        through = render(chat[: i + 1], False)
        if through.startswith(before) and full.startswith(through) and len(before) >= cursor:
            start, end = len(before), len(through)
        else:
            # The template rewrites earlier turns: find this turn's content in the full text instead.
            start = full.find(msg["content"], cursor)
            if start < 0 or not msg["content"]:
                raise UsageError(
                    f"example {example.id!r}: cannot locate assistant turn {i} in the rendered chat; "
                    "expected the chat template to render the turn's text verbatim"
                )
            end = start + len(msg["content"])
            tail = through[len(before) :] if through.startswith(before) else ""
            suffix = tail[tail.find(msg["content"]) + len(msg["content"]) :] if msg["content"] in tail else ""
            if suffix and full.startswith(suffix, end):
                end += len(suffix)  # the end-of-turn marker is learned too
        if example.messages[i].weight == 0:
            cursor = end
            continue  # not learned (OpenAI's weight 0)
        skip = example.messages[i].loss_start
        if skip:
            content_at = full.find(msg["content"], start, end)
            if content_at < 0:
                raise UsageError(
                    f"example {example.id!r}: assistant turn {i} has loss_start={skip} but its text is not found "
                    "verbatim in the rendered chat; expected the chat template to keep the turn's text"
                )
            start = content_at + skip  # the forced prefix is context; the loss starts after it
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenizer_adds_bos(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer's own encoding starts with BOS (Llama-style), else ``None``.

    Rendered chats are tokenised without special tokens; for such tokenizers the BOS is prepended unless the
    template already wrote it, matching what the generation engine feeds the model.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    try:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    except (TypeError, ValueError):
        return None
    return int(bos_id) if probe and probe[0] == bos_id else None


def encode_example(
    example: Example, tokenizer: Any, render: RenderFn, max_seq_len: int, bos_id: int | None = None
) -> Encoded:
    """Tokenise ``example`` with labels on its assistant tokens only, truncated to ``max_seq_len`` tokens.

    ``bos_id`` (see :func:`tokenizer_adds_bos`) is prepended, unlabelled, when the text does not start with it.

    Raises:
        UsageError: The example has no assistant turn, or its last turn is not the assistant's.
    """
    if not any(m.role == "assistant" for m in example.messages):
        raise UsageError(f"example {example.id!r}: has no assistant turn; a training chat ends with one")
    if example.messages[-1].role != "assistant":
        raise UsageError(
            f"example {example.id!r}: last message is {example.messages[-1].role!r}; "
            "a training chat ends with the assistant turn"
        )
    text, spans = assistant_char_spans(example, render)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        starts = [int(s) for s, _ in enc["offset_mapping"]]
    else:
        ids, starts = _encode_slow(tokenizer, text, spans)
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids, starts = [bos_id, *ids], [-1, *starts]
    labels = [IGNORE_INDEX] * len(ids)
    span_starts = [s for s, _ in spans]
    for j, (tok, start) in enumerate(zip(ids, starts, strict=True)):
        k = bisect.bisect_right(span_starts, start) - 1
        if k >= 0 and start < spans[k][1]:
            labels[j] = tok
    truncated = len(ids) > max_seq_len
    return Encoded(example.id, ids[:max_seq_len], labels[:max_seq_len], truncated)


def _encode_slow(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenise piecewise at span boundaries (slow tokenizers have no offsets); start offsets per token."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids: list[int] = []
    starts: list[int] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        starts.extend([a] * len(piece))
    return ids, starts


def encode_dataset(
    examples: Sequence[Example], tokenizer: Any, render: RenderFn, max_seq_len: int, what: str = "dataset"
) -> list[Encoded]:
    """Encode every example; examples left with no assistant token after truncation are dropped.

    Raises:
        UsageError: The dataset is empty, an example is malformed, or no example keeps an assistant token.
    """
    if not examples:
        raise UsageError(f"{what}: is empty; training needs at least one example")
    seen: set[str] = set()
    out: list[Encoded] = []
    bos_id = tokenizer_adds_bos(tokenizer)
    for ex in examples:
        if not isinstance(ex, Example):
            raise UsageError(f"{what}: expected tunesec Example objects, got {type(ex).__name__}")
        if ex.id in seen:
            raise UsageError(f"{what}: duplicate example id {ex.id!r}")
        seen.add(ex.id)
        enc = encode_example(ex, tokenizer, render, max_seq_len, bos_id)
        if enc.n_label_tokens > 0:
            out.append(enc)
    if not out:
        raise UsageError(
            f"{what}: no example keeps an assistant token within max_seq_len={max_seq_len}; raise max_seq_len"
        )
    return out


def features(encoded: Sequence[Encoded]) -> list[dict[str, list[int]]]:
    """Rows a ``Trainer`` dataset holds (``input_ids``/``labels`` lists)."""
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


def collate_packed(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Pack a micro-batch into one row (padding-free) with per-example position ids.

    transformers detects the position-id resets and attends within each example only (block-diagonal mask).
    The first token of every example gets label ``-100`` so no example predicts the next one's start.
    """
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        n = len(row["input_ids"])
        ids.extend(row["input_ids"])
        labels.extend([IGNORE_INDEX, *row["labels"][1:]])
        positions.extend(range(n))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def make_padded_collator(pad_token_id: int) -> Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """A collator that right-pads a micro-batch to its longest example, with an attention mask."""

    def collate_padded(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate_padded
