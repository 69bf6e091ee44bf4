"""Forward passes repairs take on data: per-input-column activation norms (Antidote) and the answer loss (merge-back).

Chats are tokenised as the training engine does (:func:`tunesec.training.collate.encode_dataset`: the sandboxed
chat template, labels on the assistant tokens only), one chat per pass, so no padding enters a norm or a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunesec.data.schema import Example

if TYPE_CHECKING:
    import torch


def encode(examples: Sequence[Example], tokenizer: Any, max_seq_len: int, what: str) -> list[Any]:
    """The examples tokenised with assistant-token labels (the engine's encoding)."""
    from tunesec.training.collate import chat_renderer, encode_dataset

    return encode_dataset(list(examples), tokenizer, chat_renderer(tokenizer), max_seq_len, what=what)


def input_norms(
    model: Any, encoded: Sequence[Any], names: Sequence[str], *, progress: bool = True, label: str = "calibration"
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input column of each linear weight in ``names`` over every token of ``encoded``."""
    import torch

    from tunesec.progress import make_progress

    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(weight_name: str) -> Any:
        def hook(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc = sums.get(weight_name)
            sq = x.pow(2).sum(dim=0)
            sums[weight_name] = sq if acc is None else acc + sq

        return hook

    for name in names:
        handles.append(modules[name.removesuffix(".weight")].register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad(), make_progress(progress) as bar:
            task = bar.add_task(label, total=len(encoded))
            for enc in encoded:
                model(input_ids=torch.tensor([enc.input_ids]))
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name].sqrt().float() for name in names if name in sums}


def answer_loss(model: Any, encoded: Sequence[Any]) -> float:
    """Mean cross-entropy (nats per token) of the assistant tokens of ``encoded`` under ``model``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for enc in encoded:
            ids = torch.tensor([enc.input_ids])
            labels = torch.tensor(enc.labels[1:])
            logits = model(input_ids=ids).logits[0, :-1].double()
            mask = labels != -100
            if not bool(mask.any()):
                continue
            loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            total += float(loss)
            count += int(mask.sum())
    return total / max(count, 1)
