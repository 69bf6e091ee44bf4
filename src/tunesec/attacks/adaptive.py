"""Adaptive fine-tuning attacks that account for the defense: ``sidestep`` and ``kick-settle``.

"One Step to the Side" (Zloczower et al., arXiv 2605.14605) reports that alignment-stage defenses obscure or
misdirect the path to harmful behaviour without removing it, and that an adversary who steps around the protected
directions (SIDESTEPPER) or kicks the model out of the defended basin and lets it settle (KICK-SETTLE) breaks them
while keeping task utility. The paper's code and hyperparameters are not public; both attacks here are the
reconstructions of ``shared/research/DEFENSES_SPEC.md`` section B [inferred], built as hooks on the one engine:

- ``sidestep``: harmful fine-tuning whose gradient ``g_h`` is (a) stripped of its component along a benign-anchor
  gradient ``g_u`` when the two conflict (PCGrad: ``g_h -= <g_h, g_u> / |g_u|^2 g_u`` if ``<g_h, g_u> < 0``) and
  (b) optionally stripped of the top-k directions of the harmful gradient measured on the defended model before
  the first step (the directions that Booster- and CTRAP-style defenses simulate and guard); the update is
  ``g_h + mu g_u``. Against defenses keyed to "a harmful step raises the benign loss" (CTRAP, SEAM, SDD) and to the
  single direction ``-alpha g_h / |g_h|`` (Booster, CTRAP, Vaccine's perturbation).
- ``kick-settle``: ``kick_steps`` optimizer steps on harmful data at ``kick_lr_mult`` times the learning rate, to
  leave the flattened basin that SAM-style defenses (VAA, Unlearn-Smooth, Booster) build; then the rest of the run
  at the normal rate, harmful data plus a benign anchor (weight ``mu``) to recover utility.

Both start from ``harmful-sft``'s defaults (100 BeaverTails pairs, 5 epochs, LoRA lr 5e-4) so that they are
compared with the fixed attack like for like; the benign anchor is Alpaca.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesec.attacks.base import FineTuneAttack, load_data, require_assistant_turns, sample
from tunesec.attacks.harmful_sft import HarmfulSFTConfig, build_harmful_data
from tunesec.data.schema import Example
from tunesec.registry import register
from tunesec.training.hooks import Batch, ExtraBatch, HookContext, TrainingHook

ANCHOR = "anchor"
DIRECTIONS_FILE = "sidestep_directions.safetensors"


class AnchoredAttackConfig(HarmfulSFTConfig):
    """harmful-sft's data and training, plus a benign anchor set."""

    anchor_data: str = Field("alpaca", description="Benign anchor dataset (keeps task utility while attacking).")
    n_anchor: int = Field(200, ge=1, description="Anchor examples to draw (seeded).")
    mu: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the benign anchor in the update.")


class SidestepConfig(AnchoredAttackConfig):
    """Sidestep: PCGrad against the benign anchor, optionally minus the defended model's top harmful directions."""

    pcgrad: bool = Field(True, description="Remove the harmful gradient's component against the anchor gradient.")
    top_k: int = Field(
        0, ge=0, le=64, description="Harmful-gradient directions (measured at the start) removed; 0 = off."
    )
    direction_batches: int = Field(16, ge=1, le=256, description="Harmful batches whose gradients span the directions.")


class KickSettleConfig(AnchoredAttackConfig):
    """Kick-Settle: a high-learning-rate kick on harmful data, then harmful + anchor at the normal rate."""

    kick_steps: int = Field(5, ge=1, description="Optimizer steps of the kick.")
    kick_lr_mult: float = Field(10.0, gt=0.0, le=1000.0, description="Learning-rate factor during the kick.")


def anchor_examples(config: AnchoredAttackConfig) -> list[Example]:
    """The benign anchor: a seeded sample of ``anchor_data``."""
    pool = load_data(config.anchor_data, what="anchor data")
    require_assistant_turns(pool, f"anchor data {config.anchor_data}")
    return sample(pool, min(config.n_anchor, len(pool)), config.seed, source="anchor data")


def pcgrad(g_h: Sequence[Any], g_u: Sequence[Any]) -> tuple[list[Any], float]:
    """``g_h`` without its component along ``g_u`` when they conflict (negative inner product); and that product."""
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_h, g_u, strict=True))
    if dot >= 0:
        return list(g_h), dot
    uu = sum(float((b.double() ** 2).sum()) for b in g_u)
    if uu == 0:
        return list(g_h), dot
    return [a - (dot / uu) * b for a, b in zip(g_h, g_u, strict=True)], dot


def top_directions(grads: Sequence[Sequence[Any]], k: int) -> list[list[Any]]:
    """An orthonormal basis (as parameter-shaped tensors) of the top-``k`` principal directions of the gradients.

    Computed through the small Gram matrix of the gradients (n x n), so no (n_params x n_params) matrix is formed.
    """
    import torch

    flat = torch.stack([torch.cat([g.flatten().double() for g in gs]) for gs in grads])  # n x P
    gram = flat @ flat.T
    vals, vecs = torch.linalg.eigh(gram)
    order = torch.argsort(vals, descending=True)[: min(k, flat.shape[0])]
    basis = []
    for i in order:
        if float(vals[i]) <= 1e-12:
            continue
        d = vecs[:, i] @ flat
        d = d / d.norm()
        basis.append(d)
    shapes = [g.shape for g in grads[0]]
    out = []
    for d in basis:
        parts, start = [], 0
        for shape, ref in zip(shapes, grads[0], strict=True):
            n = int(torch.Size(shape).numel())
            parts.append(d[start : start + n].view(shape).to(ref.dtype))
            start += n
        out.append(parts)
    return out


class SidestepHook(TrainingHook):
    """After the step's harmful gradient is complete: PCGrad against an anchor gradient, top-k directions removed."""

    name = "sidestep"

    def __init__(self, mu: float, use_pcgrad: bool, top_k: int, direction_batches: int) -> None:
        self.mu, self.use_pcgrad, self.top_k, self.direction_batches = mu, use_pcgrad, top_k, direction_batches
        self.directions: list[list[Any]] | None = None
        self.conflicts = 0
        self.steps = 0

    def setup(self, ctx: HookContext) -> None:
        """Cycle over the anchor (and, for the directions, over extra harmful batches of the main data)."""
        self.ctx = ctx
        self._anchor: Iterator[Batch] = ctx.batches(ANCHOR, seed=ctx.config.seed + 9)

    def _measure_directions(self, model: Any, params: list[Any]) -> list[list[Any]]:
        """The top-k harmful directions at the start, saved to the run directory (a resumed run reads them back)."""
        from safetensors.torch import load_file, save_file

        from tunesec.training.steps import gradient, trainable_parameters

        names = [n for n, _ in trainable_parameters(model)]
        path = self.ctx.out_dir / DIRECTIONS_FILE
        if path.is_file():
            saved = load_file(str(path))
            count = len(saved) // max(len(names), 1)
            return [[saved[f"{i}/{n}"].to(p.device, p.dtype) for n, p in zip(names, params, strict=True)]
                    for i in range(count)]  # fmt: skip
        stream = self.ctx.batches("harmful-directions", seed=self.ctx.config.seed + 10)
        grads = [gradient(self.ctx.lm_loss(model, next(stream)), params) for _ in range(self.direction_batches)]
        basis = top_directions(grads, self.top_k)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {f"{i}/{n}": t.contiguous() for i, d in enumerate(basis) for n, t in zip(names, d, strict=True)}, str(tmp)
        )
        tmp.replace(path)
        return basis

    def after_step(self, model: Any) -> None:
        """On the last micro-batch of a step: ``.grad`` = the sidestepped harmful gradient + mu * anchor gradient."""
        import torch

        from tunesec.training.steps import gradient, trainable_parameters

        clock = self.ctx.clock
        if clock.micro != clock.accumulation - 1:
            return
        params = [p for _, p in trainable_parameters(model)]
        if self.top_k and self.directions is None:
            self.directions = self._measure_directions(model, params)
        g_h = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for d in self.directions or []:
            dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_h, d, strict=True))
            g_h = [a - dot * b for a, b in zip(g_h, d, strict=True)]
        g_u = gradient(self.ctx.lm_loss(model, next(self._anchor)), params) if (self.use_pcgrad or self.mu) else None
        if g_u is not None and self.use_pcgrad:
            g_h, dot = pcgrad(g_h, g_u)
            self.conflicts += dot < 0
        self.steps += 1
        with torch.no_grad():
            for p, a, i in zip(params, g_h, range(len(params)), strict=True):
                p.grad = a + (self.mu * g_u[i] if g_u is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        """Counts of steps and of conflicting steps (for the provenance)."""
        return {"steps": self.steps, "conflicts": self.conflicts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counts."""
        self.steps, self.conflicts = int(state.get("steps", 0)), int(state.get("conflicts", 0))


class KickSettleHook(TrainingHook):
    """Learning rate times ``mult`` for the first ``kick_steps`` steps; the anchor mixed in after them."""

    name = "kick-settle"

    def __init__(self, kick_steps: int, mult: float, mu: float) -> None:
        self.kick_steps, self.mult, self.mu = kick_steps, mult, mu

    def setup(self, ctx: HookContext) -> None:
        """Keep the context for the anchor stream and the clock."""
        self.ctx = ctx

    def lr_scale(self, step: int) -> float:
        """The kick: ``mult`` for steps ``< kick_steps``."""
        return self.mult if step < self.kick_steps else 1.0

    def extra_batches(self) -> Iterator[ExtraBatch | None]:
        """No anchor during the kick; then one anchor batch with each micro-batch (weight ``mu``)."""
        stream = self.ctx.batches(ANCHOR, seed=self.ctx.config.seed + 11)
        while True:
            if self.ctx.clock.step < self.kick_steps or self.mu == 0:
                yield None
            else:
                yield ExtraBatch(next(stream), weight=self.mu)


class _Anchored(FineTuneAttack):
    def prepare(self, data: str | Path | Sequence[Example] | None) -> tuple[list[Example], dict[str, Any]]:
        """harmful-sft's training set; provenance: how many harmful and anchor examples."""
        assert isinstance(self.config, AnchoredAttackConfig)
        examples = build_harmful_data(self.config, data)
        self._anchor = anchor_examples(self.config)
        return examples, {"n_harmful": len(examples), "n_anchor": len(self._anchor)}

    def extra_datasets(self, examples: Sequence[Example]) -> dict[str, list[Example]]:
        """The anchor (and the harmful examples again, to measure directions on)."""
        return {ANCHOR: self._anchor, "harmful-directions": list(examples)}


@register(
    "attack",
    "sidestep",
    description="Adaptive harmful fine-tuning: PCGrad against a benign anchor, protected directions removed.",
    threat_model="open-weights",
    needs_weights=True,
    targets="booster, ctrap, seam, sdd, vaccine, t-vaccine",
)
class Sidestep(_Anchored):
    """SideStepper, reconstructed (see the module docstring)."""

    name = "sidestep"
    config_class = SidestepConfig

    def hooks(self, examples: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the gradient surgery."""
        assert isinstance(self.config, SidestepConfig)
        c = self.config
        return [SidestepHook(c.mu, c.pcgrad, c.top_k, c.direction_batches)]


@register(
    "attack",
    "kick-settle",
    description="Adaptive harmful fine-tuning: a high-learning-rate kick, then harmful + benign-anchor settling.",
    threat_model="open-weights",
    needs_weights=True,
    targets="vaa, unlearn-smooth, booster, tar",
)
class KickSettle(_Anchored):
    """Kick-Settle, reconstructed (see the module docstring)."""

    name = "kick-settle"
    config_class = KickSettleConfig

    def hooks(self, examples: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the kick's learning rate and the anchor afterwards."""
        assert isinstance(self.config, KickSettleConfig)
        c = self.config
        return [KickSettleHook(c.kick_steps, c.kick_lr_mult, c.mu)]
