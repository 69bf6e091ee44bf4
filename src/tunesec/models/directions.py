"""The refusal direction: difference of mean residual-stream activations on harmful vs harmless prompts.

Arditi et al. 2024 ("Refusal in Language Models Is Mediated by a Single Direction") show that, in chat models,
the mean activation at the last prompt token differs between harmful and harmless requests along one
direction, and that removing it from the residual stream removes refusal. tunesec uses it twice: the
``refusal-ablation`` attack orthogonalises weights against it, and certification measures how much a fine-tune's
weight update writes along it.

Layer selection: the paper picks the layer whose ablation best removes refusal, which needs generations per
candidate. Here the default picks, among the middle layers (20%–80% of depth, where the paper's choices lie),
the one where the harmful and harmless activations are best separated along their own mean difference
(a signal-to-noise ratio); callers that need the paper's selection can pass ``layer`` explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesec.models.chat import ChatFormatter
from tunesec.models.loading import LoadedModel
from tunesec.models.types import Prompt, as_chat


@dataclass
class RefusalDirection:
    """Per-layer mean differences and the selected layer.

    Attributes:
        directions: Tensor ``[n_layers + 1, hidden]``: mean(harmful) - mean(harmless) of the residual stream at
            the last prompt token, for the embedding output (index 0) and after each decoder layer.
        layer: The selected index into ``directions``.
        separation: Per-layer signal-to-noise ratio used for the selection.
    """

    directions: Any
    layer: int
    separation: list[float]

    def unit(self, layer: int | None = None) -> Any:
        """The unit-norm direction at ``layer`` (the selected one by default)."""
        d = self.directions[self.layer if layer is None else layer]
        return d / d.norm().clamp_min(1e-12)


def last_token_activations(
    loaded: LoadedModel, prompts: Sequence[Prompt], *, batch_size: int = 16, system_prompt: str | None = None
) -> Any:
    """Residual-stream activations at each prompt's last token: tensor ``[n_prompts, n_layers + 1, hidden]``.

    Prompts are rendered with the chat template and the generation prompt, so the last token is where the
    model decides how to begin its answer.
    """
    import torch

    fmt = ChatFormatter(loaded.tokenizer)
    model = loaded.model
    device = next(model.parameters()).device
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    encoded = [fmt.encode(as_chat(p, system_prompt)) for p in prompts]
    out: list[Any] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, e in enumerate(batch):
                ids[r, width - len(e) :] = torch.tensor(e)
                mask[r, width - len(e) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            res = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                output_hidden_states=True,
                use_cache=False,
                logits_to_keep=1,
            )
            out.append(torch.stack([h[:, -1, :].float().cpu() for h in res.hidden_states], dim=1))
    return torch.cat(out, dim=0)


def refusal_directions(
    loaded: LoadedModel,
    harmful_prompts: Sequence[Prompt],
    harmless_prompts: Sequence[Prompt],
    *,
    batch_size: int = 16,
    layer: int | None = None,
) -> RefusalDirection:
    """Compute the per-layer refusal directions and select a layer (see the module docstring).

    Args:
        loaded: The (aligned) model whose refusal behaviour is analysed.
        harmful_prompts: Requests the model should refuse (e.g. AdvBench goals).
        harmless_prompts: Comparable benign requests (e.g. Alpaca instructions).
        batch_size: Prompts per forward pass.
        layer: Force this layer instead of the automatic choice.
    """
    if not harmful_prompts or not harmless_prompts:
        from tunesec.errors import UsageError

        raise UsageError("refusal direction: needs at least one harmful and one harmless prompt")
    harm = last_token_activations(loaded, harmful_prompts, batch_size=batch_size)
    safe = last_token_activations(loaded, harmless_prompts, batch_size=batch_size)
    diffs = harm.mean(0) - safe.mean(0)  # [L+1, d]
    separation: list[float] = []
    for i in range(diffs.shape[0]):
        u = diffs[i] / diffs[i].norm().clamp_min(1e-12)
        ph, ps = harm[:, i] @ u, safe[:, i] @ u
        spread = ((ph.var(unbiased=False) + ps.var(unbiased=False)) / 2).sqrt().clamp_min(1e-6)
        separation.append(float((ph.mean() - ps.mean()) / spread))
    if layer is None:
        n = diffs.shape[0]
        lo, hi = max(1, int(0.2 * n)), max(2, int(0.8 * n))
        layer = max(range(lo, hi), key=lambda i: separation[i])
    return RefusalDirection(directions=diffs, layer=layer, separation=separation)
