"""A loss on the refusal decision at the first answer token, added to supervised alignment.

In supervised safety tuning the choice between refusing and answering is made at the first assistant token, yet
that token is one of the ~60-150 tokens whose cross-entropy is averaged into the loss: the decision carries a
tiny share of it, and the rest goes to reproducing the refusal and answer texts. (The same showed in tunesec's
backdoor attack: triggered answers that each opened differently did not implant the trigger; one shared opening
sentence did, docs/RESULTS.md.) A linear probe on the aligned SmolLM2's own features separates JBB's harmful and
benign requests better than the adapter's behaviour does (docs/RESULTS.md), which suggests the decision is
under-trained rather than out of reach of the features.

:class:`RefusalDecisionLoss` adds, at the first token of each assistant turn, the binary cross-entropy of
``P(first token is a refusal opener)`` (the probability mass on the first tokens of
:data:`tunesec.models.directions.REFUSAL_OPENERS`) against whether the example's own first token is one,
averaged over the turns in the micro-batch and multiplied by ``weight``. Labels come from the tokens, so the term
agrees with the language-modelling loss and needs no metadata; a helpful answer that happens to open with a
refusal opener's first token ("I" of "I'm sorry" vs "I'd suggest") counts on the refusal side, as it does for the
next-token loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunesec.training.hooks import Batch, HookContext, TrainingHook

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


def turn_starts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where assistant turns start among the positions the engine computes logits for.

    Args:
        labels: ``[batch, seq]`` token labels, ``-100`` outside assistant turns (the engine's collation; packed
            rows hold several examples separated by non-assistant tokens).

    Returns:
        ``(index, first_tokens)``: for each turn, its row in the engine's ``[n, vocab]`` logits (positions whose
        next token is an assistant token, row-major) and the turn's first token id.
    """
    import torch

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    before = torch.zeros_like(keep)
    before[:, 1:] = keep[:, :-1]
    start = keep & ~before
    index = (keep.flatten().cumsum(0) - 1)[start.flatten()]
    return index, targets[start]


class RefusalDecisionLoss(TrainingHook):
    """Binary cross-entropy on the refuse/answer decision at each assistant turn's first token.

    Args:
        weight: Multiplier of the term (the language-modelling loss is a per-token mean, so 1.0 gives the
            decision about as much weight as all other tokens together).
        openers: Texts whose first tokens count as refusing (default
            :data:`tunesec.models.directions.REFUSAL_OPENERS`).
        refusal_weight: Weight of the refusal turns' terms relative to the answers' (a positive-class weight):
            above 1 the learned decision leans towards refusing, below 1 towards answering.
    """

    name = "refusal-decision-loss"

    def __init__(self, weight: float = 1.0, openers: Sequence[str] | None = None, refusal_weight: float = 1.0) -> None:
        if weight < 0 or refusal_weight <= 0:
            raise ValueError(
                f"decision loss: weight must be >= 0 and refusal_weight > 0, got {weight}, {refusal_weight}"
            )
        self.weight = weight
        self.refusal_weight = refusal_weight
        self.openers = tuple(openers) if openers is not None else None
        self.ids: Any = None

    def setup(self, ctx: HookContext) -> None:
        """Token ids of the refusal openers' first tokens under the run's tokenizer."""
        import torch

        from tunesec.models.directions import REFUSAL_OPENERS, refusal_token_ids

        ids = refusal_token_ids(ctx.tokenizer, self.openers or REFUSAL_OPENERS)
        if not ids:
            raise ValueError("decision loss: no refusal opener encodes to a token")
        self.ids = torch.tensor(ids, dtype=torch.long, device=ctx.device)

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> torch.Tensor | None:
        """The weighted decision loss of this micro-batch (``None`` when it holds no assistant turn start)."""
        import torch

        index, first = turn_starts(inputs["labels"])
        if index.numel() == 0 or self.weight == 0:
            return None
        ids = self.ids.to(first.device)
        logits = outputs.logits[index.to(outputs.logits.device)].float()
        log_p = torch.logsumexp(logits[:, ids], dim=-1) - torch.logsumexp(logits, dim=-1)
        log_not = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
        refusal = torch.isin(first, ids).to(logits.device)
        terms = torch.where(refusal, self.refusal_weight * log_p, log_not)
        return -self.weight * terms.mean()
