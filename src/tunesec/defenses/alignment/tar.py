"""``tar``: tamper-resistant safeguards by meta-learning against simulated attackers (Tamirisa et al. 2024, TAR).

TAR trains the model so that a fine-tuning attacker who starts from it cannot recover the harmful behaviour: each
outer step simulates an attack (K inner fine-tuning steps on harmful data, from the current weights, with a
sampled learning rate), measures at the attacked weights a *tamper-resistance* loss on held-out harmful data, and
moves the real weights so that this loss stays good after the attack (first-order meta-gradient, as MAML's
first-order form). A retain loss and a representation anchor to the starting model keep it useful. Official code:
rishub-tamirisa/tamper-resistance@19de233 ``modules/training.py::tar_training_loop``:

    for each outer step:
        snapshot w; sample the adversary's learning rate
        K inner AdamW steps on CE(forget) from w; every `meta_every` inner steps k:
            meta += 4.0 * exp(0.0625 (k - K + 1)) * grad L_TR(w_k; held-out forget batch)
        restore w
        grad = meta + grad [CE(retain) + anchor * mean_l |h_l(w) - h_l(w_start)|]

Tamper-resistance loss, two forms as in the official code (``modules/objectives.py``): ``entropy`` (``L_TR =
-entropy`` of the next-token distribution at the held-out harmful answers' positions: after an attack the model
should stay uncertain on harmful answers; the paper's weaponization-knowledge setting, grad scale 4) and ``dpo``
(the paper's refusal setting, ``run_tar_dpo.sh``: grad scale 0.1, DPO beta 0.1): after an attack the model should
still prefer a refusal (chosen) to the harmful answer (rejected) of each held-out harmful prompt, relative to the
start model: ``L_TR = -log sigmoid(beta ((lp(c) - lp(r)) - (lp_start(c) - lp_start(r))))``. The refusals are the
recipe's own refusal answers, assigned to the held-out prompts in turn. The default stays ``entropy`` at scale 4
(the form the issue names); on SmolLM2 it collapsed the model into repetition (docs/DEFENSES.md).

As built here: the retain loss is the shipped aligned recipe's training batch (its refusals and helpful answers);
forget and held-out forget data are two disjoint halves of the harmful pairs (``judge-pku`` unsafe rows, disjoint
from the attacks' data); the start model for the anchor is the weights before the first step (saved to the run
directory for resume). CPU-sized (the paper: K = 64 inner steps, a meta-gradient every 4th, 750 outer steps on 8
A100s, ~81 forward-backward passes per step): K = 2 inner steps with one meta-gradient at the last, adversary
learning rates {1e-4, 5e-4, 1e-3} (the LoRA attack's 5e-4 in the middle; the paper's {2e-6, 2e-5, 4e-5} are for
full fine-tuning), about 4.3 passes per step. The recipe's 155 steps project to about 36 minutes on the 2-core machine
of 2026-12-02 (8-step benchmark) but ran at 31-42 s per step (about 90 minutes) on AVX2-only ones, and the dpo form
(about 6 passes: the start model's log-probs at the attacked weights too) at 46.6 s (120 minutes; docs/DEFENSES.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesec.data.schema import Example, Message
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.errors import UsageError
from tunesec.registry import register
from tunesec.training.hooks import Batch, GradientTermHook, HookContext, TrainingHook

HELD_OUT = "harmful-heldout"
HELD_OUT_REFUSED = "harmful-heldout-refused"  # the held-out prompts with refusal answers (the DPO form's chosen)
REFERENCE_FILE = "tar_reference.safetensors"


class TARConfig(HookedAlignmentConfig):
    """TAR: first-order meta-learning against simulated harmful fine-tuning, CPU-sized."""

    inner_steps: int = Field(2, ge=1, le=256, description="K: the simulated attacker's fine-tuning steps.")
    meta_every: int = Field(2, ge=1, description="Take the tamper-resistance gradient every this many inner steps.")
    adversary_lrs: list[float] = Field(
        default_factory=lambda: [1e-4, 5e-4, 1e-3], description="Learning rates the attacker's AdamW is drawn from."
    )
    tr_scale: float = Field(
        4.0,
        ge=0.0,
        le=1000.0,
        description="Scale of the tamper-resistance meta-gradient (default 4; 0.1 with tr_loss=dpo, as the paper's).",
    )
    tr_decay: float = Field(
        0.0625, ge=0.0, le=10.0, description="w_k = exp(tr_decay (k - K + 1)) weighs later steps more."
    )
    anchor: float = Field(1.0, ge=0.0, le=1000.0, description="Weight of the representation anchor to the start model.")
    tr_loss: Literal["entropy", "dpo"] = Field(
        "entropy", description="L_TR: -entropy on harmful answers, or DPO of a refusal over the harmful answer."
    )
    dpo_beta: float = Field(0.1, gt=0.0, le=10.0, description="DPO's beta in the dpo form of L_TR.")

    @model_validator(mode="before")
    @classmethod
    def _dpo_scale(cls, data: Any) -> Any:
        """The dpo form's own default grad scale (the official refusal run's 0.1) unless one is given."""
        if isinstance(data, dict) and data.get("tr_loss") == "dpo" and "tr_scale" not in data:
            data = {**data, "tr_scale": 0.1}
        return data

    @field_validator("adversary_lrs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(lr <= 0 for lr in v):
            raise ValueError("give at least one learning rate, each > 0")
        return v


def entropy_loss(logits: Any) -> Any:
    """``-entropy`` of the next-token distributions (rows of ``logits``), averaged: TAR's entropy-form L_TR."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * logp).sum(-1).mean()


def answer_logits(model: Any, batch: Batch) -> Any:
    """Logits at the positions that predict the batch's answer tokens."""
    from tunesec.training.collate import IGNORE_INDEX

    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, :-1][keep]


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> Any:
    """DPO's sigmoid loss over sequence log-probabilities: ``-log sigmoid(beta (chosen margin - reference's))``.

    ``log 2`` when the model's margins equal the reference's; falls as the model prefers the chosen answers more.
    """
    import torch.nn.functional as F  # noqa: N812

    return -F.logsigmoid(beta * ((chosen - rejected) - (ref_chosen - ref_rejected))).mean()


class TamperResistance(GradientTermHook):
    """TAR's simulated attacks, meta-gradient and representation anchor as a training hook."""

    name = "tar"
    needs_hidden_states = True

    def __init__(
        self,
        inner_steps: int = 2,
        meta_every: int = 2,
        adversary_lrs: Sequence[float] = (1e-4, 5e-4, 1e-3),
        tr_scale: float = 4.0,
        tr_decay: float = 0.0625,
        anchor: float = 1.0,
        tr_loss: str = "entropy",
        dpo_beta: float = 0.1,
    ) -> None:
        self.k, self.every, self.lrs = inner_steps, meta_every, list(adversary_lrs)
        self.scale, self.decay, self.anchor = tr_scale, tr_decay, anchor
        self.tr_loss, self.beta = tr_loss, dpo_beta
        self.reference: Any = None
        self._ref_hidden: list[Any] | None = None
        self.last: dict[str, float] = {}

    def pop_metrics(self) -> dict[str, float]:
        """Measured since the last call: L_TR at the attacked weights, the adversary's learning rate, the anchor."""
        out, self.last = self.last, {}
        return out

    def setup(self, ctx: HookContext) -> None:
        """Streams over the forget pairs (the attacker's) and the held-out forget pairs (L_TR's)."""
        self.ctx = ctx
        self._forget: Iterator[Batch] = ctx.batches(HARMFUL, seed=ctx.config.seed + 7)
        self._held_out: Iterator[Batch] = ctx.batches(HELD_OUT, seed=ctx.config.seed + 8)
        if self.tr_loss == "dpo":
            # the same seed over a dataset of the same length: batch i holds the same prompts in both streams
            # (a row is dropped only when its prompt leaves no room for the answer, so both lose the same rows)
            rejected, chosen = ctx.extra_datasets[HELD_OUT], ctx.extra_datasets.get(HELD_OUT_REFUSED, [])
            if len(chosen) != len(rejected):
                raise UsageError(
                    f"tar: the dpo form needs each held-out harmful prompt with a refusal; got {len(rejected)} "
                    f"harmful and {len(chosen)} refused rows"
                )
            self._chosen: Iterator[Batch] = ctx.batches(HELD_OUT_REFUSED, seed=ctx.config.seed + 8)

    def _start(self, model: Any) -> Any:
        from tunesec.training.steps import WeightSnapshot, trainable_parameters

        if self.reference is None:
            snap = WeightSnapshot(trainable_parameters(model))
            path = self.ctx.out_dir / REFERENCE_FILE
            if path.is_file():
                snap.load(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                snap.save(path)
            self.reference = snap
        return self.reference

    def attack(self, model: Any, params: list[Any], lr: float) -> list[Any]:
        """K AdamW steps on forget batches from the current weights; the weighted sum of the L_TR gradients.

        The weights are left at the attacked point; the caller restores them.
        """
        import torch

        from tunesec.training.steps import gradient

        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        meta = [torch.zeros_like(p) for p in params]
        for k in range(self.k):
            g = gradient(self.ctx.lm_loss(model, next(self._forget)), params)
            with torch.no_grad():
                for p, gi, mi, vi in zip(params, g, m, v, strict=True):
                    mi.mul_(b1).add_(gi, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(gi, gi, value=1 - b2)
                    step = (mi / (1 - b1 ** (k + 1))) / ((vi / (1 - b2 ** (k + 1))).sqrt() + eps)
                    p.sub_(lr * step)
            if (k + 1) % self.every == 0:
                weight = self.scale * math.exp(self.decay * (k - self.k + 1))
                tr = self.tamper_loss(model)
                self.last["tamper_loss"] = float(tr.detach())
                for acc, gi in zip(meta, gradient(tr, params), strict=True):
                    acc.add_(gi, alpha=weight)
        return meta

    def tamper_loss(self, model: Any) -> Any:
        """L_TR on the next held-out batch at the current (attacked) weights, in the configured form."""
        import torch

        from tunesec.training.steps import sequence_logprobs

        if self.tr_loss != "dpo":
            return entropy_loss(answer_logits(model, next(self._held_out)))
        rejected, chosen = next(self._held_out), next(self._chosen)
        with torch.no_grad(), self._start(model).swapped_in():
            ref_c, ref_r = sequence_logprobs(model, chosen), sequence_logprobs(model, rejected)
        return dpo_loss(sequence_logprobs(model, chosen), sequence_logprobs(model, rejected), ref_c, ref_r, self.beta)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """The simulated attack (weights restored after it); the start model's hidden states for the anchor."""
        import torch

        from tunesec.training.steps import step_rng, trainable_parameters

        start = self._start(model)
        params = [p for _, p in trainable_parameters(model)]
        lr = step_rng(self.ctx.config.seed, self.ctx.clock, "tar-lr").choice(self.lrs)
        saved = [p.detach().clone() for p in params]
        try:
            self.keep_term(params, self.attack(model, params, lr))
        finally:
            with torch.no_grad():  # the simulated attack never reaches the real weights
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        self.last["adversary_lr"] = lr
        if self.anchor > 0:
            kwargs = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
            with torch.no_grad(), start.swapped_in():
                out = model(input_ids=inputs["input_ids"], output_hidden_states=True, use_cache=False, **kwargs)
            self._ref_hidden = [h.detach() for h in out.hidden_states[1:]]

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> Any:
        """``anchor * mean over layers of the mean token distance |h_l - h_l(start)|`` on the retain batch."""
        import torch

        if self.anchor <= 0 or self._ref_hidden is None:
            return None
        dist = [(h - r).norm(dim=-1).mean() for h, r in zip(outputs.hidden_states[1:], self._ref_hidden, strict=True)]
        self._ref_hidden = None
        loss = torch.stack(dist).mean()
        self.last["anchor"] = float(loss.detach())
        return self.anchor * loss


@register(
    "defense",
    "tar",
    description="Tamper-resistant training: meta-learn against simulated harmful fine-tuning (K inner steps).",
    stage="alignment",
    paper="Tamirisa et al. 2024, Tamper-Resistant Safeguards for Open-Weight LLMs, arXiv 2408.00761",
    threat_model="open-weights",
    needs_harmful=True,
)
class TAR(HookedAlignment):
    """TAR (see the module docstring)."""

    name = "tar"
    config_class = TARConfig
    needs_harmful = True

    def extra_datasets(self, harmful: Sequence[Example], data: Sequence[Example]) -> dict[str, list[Example]]:
        """Two disjoint halves of the harmful pairs: the attacker's and the tamper-resistance loss's.

        The dpo form adds the held-out prompts answered with the mix's refusals (in turn), its chosen answers.
        """
        assert isinstance(self.config, TARConfig)
        half = len(harmful) // 2
        held_out = list(harmful[half:])
        out = {HARMFUL: list(harmful[:half]), HELD_OUT: held_out}
        if self.config.tr_loss == "dpo":
            # a safety-recovery example's refusal is what follows its harmful prefix (the part with the loss)
            refusals = [
                e.messages[-1].content[e.messages[-1].loss_start :].lstrip()
                if e.messages[-1].loss_start
                else e.messages[-1].content
                for e in data
                if e.meta.get("align_kind") in ("refusal", "deep-refusal")
            ]
            if not refusals:
                raise UsageError("tar: tr_loss=dpo needs refusal examples in the alignment mix for its chosen answers")
            out[HELD_OUT_REFUSED] = [
                e.model_copy(
                    update={
                        "id": f"{e.id}-refused",
                        "messages": [*e.messages[:-1], Message(role="assistant", content=refusals[i % len(refusals)])],
                    }
                )
                for i, e in enumerate(held_out)
            ]
        return out

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: simulated attacks, meta-gradient, anchor."""
        assert isinstance(self.config, TARConfig)
        c = self.config
        return [
            TamperResistance(
                c.inner_steps, c.meta_every, c.adversary_lrs, c.tr_scale, c.tr_decay, c.anchor, c.tr_loss, c.dpo_beta
            )
        ]
