"""``repnoise``: representation noising (Rosati et al. 2024, arXiv 2405.14577).

Harmful fine-tuning works because the aligned model still *holds* the harmful information in its hidden
representations; refusal only hides it. RepNoise removes it: on harmful (request, harmful answer) pairs the MLP
activations of every layer are pushed towards Gaussian noise (an MMD term), and the harmful answer is made
unpredictable from every layer's representation (gradient ascent through the logit lens, in a bounded log form),
while the paired harmless answers are still learned. Official loss (domenicrosati/representation-noising@a1c3298,
``representation_noising/loss.py::rep_noise_loss``):

    L = CE_m(harmless) + beta * mean_l MMD(a_l^harm[m], N(0, I))
        - alpha * log(1 + (CE_m(final) + sum_i CE_m(W_U norm(h_i))) / n)

with ``m`` the answer tokens, ``a_l`` the MLP outputs, ``h_i`` the ``n`` hidden states (embeddings included), MMD a
sum of 5 Gaussian kernels whose bandwidths are the mean pairwise squared distance times 2^-2 .. 2^2.

As built here: the training batches are the shipped aligned recipe's mix (the harmless side, with its refusals),
and every micro-batch also takes one batch of harmful pairs (``judge-pku`` unsafe rows, disjoint from the attacks'
data) for the noise and ascent terms, backpropagated in the same step. Two departures, both for a 135M model on a
CPU: the MMD compares the *token* activations at the answer positions with as many Gaussian samples (the official
code flattens each padded example into one vector, which needs equal-length padded batches), and the logit-lens
cross-entropy is taken on ``lens_tokens`` answer tokens drawn per step (all of them over 30 layers would hold
30 x tokens x 49k logits). Defaults: alpha 1, beta 1e-3 (the official notebook); training is the shipped recipe
(the paper: full fine-tuning, lr 1e-4, 1 epoch over 1k pairs; its README warns that lr, alpha and beta need a grid
search per model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook


class RepNoiseConfig(HookedAlignmentConfig):
    """RepNoise: noise on harmful representations and logit-lens ascent, on top of the shipped recipe."""

    alpha: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the logit-lens ascent term (log form).")
    beta: float = Field(1e-3, ge=0.0, le=100.0, description="Weight of the MMD-to-Gaussian noise term.")
    lens_tokens: int = Field(
        64, ge=1, description="Answer tokens per step on which every layer's logit lens is scored."
    )
    harmful_batch_size: int | None = Field(None, ge=1, description="Harmful pairs per micro-batch (default: training).")


def mmd(x: Any, y: Any, kernel_mul: float = 2.0, kernel_num: int = 5) -> Any:
    """Maximum mean discrepancy between samples ``x`` and ``y`` (rows) with RepNoise's 5 Gaussian kernels.

    Bandwidths: the mean pairwise squared distance of the pooled samples times ``kernel_mul ** (i - kernel_num // 2)``.
    ``mmd(x, x)`` is 0.
    """
    import torch

    n = x.shape[0]
    total = torch.cat([x, y], dim=0)
    d2 = torch.cdist(total, total).pow(2)
    m = total.shape[0]
    bandwidth = d2.detach().sum() / max(m * m - m, 1)
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    k = torch.stack([torch.exp(-d2 / (bandwidth * kernel_mul**i).clamp_min(1e-12)) for i in range(kernel_num)]).sum(0)
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


class RepresentationNoise(TrainingHook):
    """RepNoise's harmful-side terms as a hook (the harmless side is the engine's own batch)."""

    name = "repnoise"

    def __init__(self, alpha: float, beta: float, lens_tokens: int = 64, batch_size: int | None = None) -> None:
        self.alpha, self.beta, self.lens_tokens, self.batch_size = alpha, beta, lens_tokens, batch_size
        self.last: dict[str, float] = {}

    def pop_metrics(self) -> dict[str, float]:
        """Measured since the last call: the MMD to noise and the harmful answers' logit-lens cross-entropy."""
        out, self.last = self.last, {}
        return out

    def setup(self, ctx: HookContext) -> None:
        """Cycle over the harmful pairs."""
        self.ctx = ctx
        self._harmful: Iterator[Batch] = ctx.batches(HARMFUL, batch_size=self.batch_size, seed=ctx.config.seed + 4)

    def loss(self, model: Any, batch: Batch) -> Any:
        """``beta * mean_l MMD - alpha * log(1 + mean logit-lens CE)`` on one harmful batch (differentiable)."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        from tunesec.training.collate import IGNORE_INDEX
        from tunesec.training.steps import ActivationTap, logit_lens_losses, step_rng

        labels = batch["labels"]
        keep = labels[:, 1:] != IGNORE_INDEX  # answer positions (predicting positions: [:, :-1])
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        tap = ActivationTap(model, "mlp")
        with tap.recording():
            out = model(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False, **kwargs)
        acts = [tap.outputs[n] for n in tap.names]
        tap.outputs = {}
        # the noise samples of a step are the same after a resume
        gen = torch.Generator(device="cpu").manual_seed(
            (self.ctx.config.seed * 1_000_003 + self.ctx.clock.step) % 2**31
        )
        noise_terms = []
        for a in acts:
            x = a[:, 1:][keep].float()
            y = torch.randn(x.shape, generator=gen).to(x.device)
            noise_terms.append(mmd(x, y))
        noise = torch.stack(noise_terms).mean()
        final = F.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep])
        rng = step_rng(self.ctx.config.seed, self.ctx.clock, "repnoise-lens")
        lens = logit_lens_losses(model, batch, out.hidden_states, self.lens_tokens, rng)
        ascent = (final + lens.sum()) / len(out.hidden_states) + 1.0
        self.last = {"mmd": float(noise.detach()), "harmful_ce": float(ascent.detach()) - 1.0}
        return self.beta * noise - self.alpha * torch.log(ascent)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """Backpropagate the harmful-side terms of the next harmful batch (divided by the accumulation count)."""
        loss = self.loss(model, next(self._harmful)) / max(self.ctx.clock.accumulation, 1)
        loss.backward()


@register(
    "defense",
    "repnoise",
    description="Representation noising: harmful activations pushed towards Gaussian noise, logit-lens ascent.",
    stage="alignment",
    paper="Rosati et al. 2024, Representation Noising, arXiv 2405.14577",
    threat_model="open-weights",
    needs_harmful=True,
)
class RepNoise(HookedAlignment):
    """RepNoise (see the module docstring)."""

    name = "repnoise"
    config_class = RepNoiseConfig
    needs_harmful = True

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the harmful-side terms."""
        assert isinstance(self.config, RepNoiseConfig)
        c = self.config
        return [RepresentationNoise(c.alpha, c.beta, c.lens_tokens, c.harmful_batch_size)]
