"""A loss on the refusal decision at the first answer tokens, added to supervised alignment.

In supervised safety tuning the choice between refusing and answering is made at the first assistant token, yet
that token is one of the ~60-150 tokens whose cross-entropy is averaged into the loss: the decision carries a
tiny share of it, and the rest goes to reproducing the refusal and answer texts. (The same showed in tunesec's
backdoor attack: triggered answers that each opened differently did not implant the trigger; one shared opening
sentence did, docs/RESULTS.md.) A linear probe on the features of SmolLM2 aligned without this loss (v9)
separates JBB's harmful and benign requests better than that adapter's behaviour does (docs/RESULTS.md), which
suggested the decision was under-trained rather than out of reach of the features.

:class:`RefusalDecisionLoss` adds, for each assistant turn, a cross-entropy on that decision: a turn that opens
with a refusal opener (:data:`tunesec.models.directions.REFUSAL_OPENERS`, as token sequences) contributes the
log-probability of its whole opener; any other turn contributes ``log(1 - P(first token opens a refusal))``;
the mean over the micro-batch's turns, times ``weight``, is added to the loss. Labels come from the tokens, so the
term agrees with the language-modelling loss and needs no metadata; a refusal that opens otherwise ("No, it
is not safe ...") counts as an answer. Measured on SmolLM2-135M (docs/RESULTS.md,
v15-v17): the first-token-only version taught the model to open harmful answers with "I" and go on with "'m
thrilled to share ..."; the whole-opener version gave the shipped adapter.
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
    """Cross-entropy on the refuse/answer decision at the start of each assistant turn.

    A turn that opens with one of the refusal openers' token sequences is a refusal; its term is the
    log-probability of that whole opener (``whole_opener``), or of the first tokens' refusal mass
    (``whole_opener=False``). A turn whose first token is not a refusal opener's first token is an answer; its
    term is ``log(1 - P(first token is a refusal opener's first token))``. A turn that opens with such a first
    token but no whole opener ("I'd suggest" next to "I'm sorry") is ambiguous and left out when
    ``whole_opener`` is on; with it off, it counts as a refusal, as in the first-token version.

    Why whole openers: with SmolLM2's tokenizer "I'm sorry" and "I'm thrilled" share their first two tokens, so
    a first-token loss teaches the model to begin with "I" on harmful requests but not to go on with "'m sorry"
    (measured: candidate v15 answered JBB-harmful requests with "I'm thrilled to share ...", docs/RESULTS.md).

    Args:
        weight: Multiplier of the term (the language-modelling loss is a per-token mean, so 1.0 gives the
            decision about as much weight as all other tokens together).
        openers: Texts that open a refusal (default :data:`tunesec.models.directions.REFUSAL_OPENERS`).
        refusal_weight: Weight of the refusal turns' terms relative to the answers' (a positive-class weight):
            above 1 the learned decision leans towards refusing, below 1 towards answering.
        whole_opener: Score a refusal turn on its whole opener (default) rather than on its first token.
        breaks: Leading text after which an opener still makes the turn a refusal, scored with it: a
            safety-recovery turn of deep alignment (:mod:`tunesec.defenses.alignment.safety_sft`) starts with a
            paragraph break after its loss-free harmful prefix, and the break is what decides to refuse there.
        continue_weight: Weight of the contrast to those recovery turns: in every answer turn, at each token
            whose target is not a break's first token, ``log(1 - P(break's first token))``, summed over the
            turn (positions where the model keeps P low add almost nothing, so the term acts where it is tempted
            to break off), averaged over answer turns. Without it, recovery examples cut mid-sentence teach the
            model to break off benign answers mid-sentence and refuse (measured: candidate v23, docs/RESULTS.md).
    """

    name = "refusal-decision-loss"

    def __init__(
        self,
        weight: float = 1.0,
        openers: Sequence[str] | None = None,
        refusal_weight: float = 1.0,
        whole_opener: bool = True,
        breaks: Sequence[str] = ("\n\n",),
        continue_weight: float = 0.0,
    ) -> None:
        if weight < 0 or refusal_weight <= 0 or continue_weight < 0:
            raise ValueError(
                "decision loss: weight and continue_weight must be >= 0 and refusal_weight > 0, got "
                f"{weight}, {continue_weight}, {refusal_weight}"
            )
        self.weight = weight
        self.refusal_weight = refusal_weight
        self.whole_opener = whole_opener
        self.openers = tuple(openers) if openers is not None else None
        self.breaks = tuple(breaks)
        self.continue_weight = continue_weight
        self.ids: Any = None
        self.break_ids: list[int] = []
        self.sequences: list[tuple[int, ...]] = []

    def setup(self, ctx: HookContext) -> None:
        """Token sequences of the refusal openers, and their first tokens, under the run's tokenizer."""
        import torch

        from tunesec.models.directions import REFUSAL_OPENERS

        def encode(text: str) -> tuple[int, ...]:
            return tuple(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])

        openers = [encode(t) for t in self.openers or REFUSAL_OPENERS]
        if not any(openers):
            raise ValueError("decision loss: no refusal opener encodes to a token")
        # After a break the opener's tokens are the break's then the opener's own (checked, not assumed).
        after_break = [encode(b + t) for b in self.breaks for t in self.openers or REFUSAL_OPENERS]
        opener_first = {o[0] for o in openers if o}
        seqs = {s for s in openers if s} | {s for s in after_break if s and s[0] not in opener_first}
        self.sequences = sorted(seqs, key=len, reverse=True)  # longest match first
        # The tokens a recovery turn starts with ("\n" for SmolLM2, where "\n\n" before a word is two "\n").
        self.break_ids = sorted({s[0] for s in after_break if s and s[0] not in opener_first})
        # Only the openers' own first tokens are "refusal" first tokens; a turn opening with a break and no
        # opener after it is an ordinary answer.
        first = sorted({s[0] for s in openers if s})
        self.ids = torch.tensor(first, dtype=torch.long, device=ctx.device)

    def _opener_length(self, tokens: list[int]) -> int:
        """Length of the longest refusal opener that ``tokens`` start with (0: none)."""
        for seq in self.sequences:
            if tuple(tokens[: len(seq)]) == seq:
                return len(seq)
        return 0

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> torch.Tensor | None:
        """The weighted decision loss of this micro-batch (``None`` when it holds no turn to score)."""
        import torch

        index, first = turn_starts(inputs["labels"])
        if index.numel() == 0 or (self.weight == 0 and self.continue_weight == 0):
            return None
        targets = inputs["labels"][:, 1:]
        flat = targets[targets != IGNORE_INDEX].tolist()  # the logits rows' target tokens, in order
        logits = outputs.logits
        ids = self.ids.to(logits.device)
        first_ids = set(self.ids.tolist())
        starts = index.tolist()
        ends = [*starts[1:], len(flat)]  # a turn's rows run up to the next turn's first row
        terms: list[torch.Tensor] = []
        keep_going: list[torch.Tensor] = []  # answers' continuation terms (continue_weight)
        for row, end, tok in zip(starts, ends, first.tolist(), strict=True):
            head = logits[row].float()
            n = self._opener_length(flat[row:end]) if self.whole_opener else 0
            if n:  # a refusal: the log-probability of its whole opener
                rows = logits[row : row + n].float().log_softmax(-1)
                want = torch.tensor(flat[row : row + n], device=rows.device)
                terms.append(self.refusal_weight * rows.gather(1, want[:, None]).sum())
                continue
            if self.continue_weight > 0 and self.break_ids and tok not in first_ids:
                keep_going.append(self._continuation_term(logits, flat, row, end))
            log_p = torch.logsumexp(head[ids], dim=-1) - torch.logsumexp(head, dim=-1)
            if tok in first_ids:
                if self.whole_opener:
                    continue  # opens like a refusal but is none: ambiguous at the first token
                terms.append(self.refusal_weight * log_p)
            else:  # an answer: push the refusal openers' first-token mass down
                terms.append(torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)))
        loss = -self.weight * torch.stack(terms).mean() if terms and self.weight > 0 else None
        if keep_going:
            extra = -self.continue_weight * torch.stack(keep_going).mean()
            loss = extra if loss is None else loss + extra
        return loss

    def _continuation_term(self, logits: torch.Tensor, flat: list[int], row: int, end: int) -> torch.Tensor:
        """Sum of ``log(1 - P(break))`` over an answer turn's rows whose target is not a break token."""
        import torch

        breaks = torch.tensor(self.break_ids, device=logits.device)
        targets = torch.tensor(flat[row:end], device=logits.device)
        rows = logits[row:end].float()
        log_p = torch.logsumexp(rows[:, breaks], dim=-1) - torch.logsumexp(rows, dim=-1)
        keep = ~torch.isin(targets, breaks)
        return torch.log1p(-log_p[keep].exp().clamp(max=1 - 1e-6)).sum()
