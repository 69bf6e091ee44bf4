"""``vaa``: vulnerability-aware alignment (Chen et al. 2025, VAA, arXiv 2506.03850).

Harmful fine-tuning does not erase alignment evenly: some alignment examples are forgotten far more than others.
VAA splits the alignment data into a *vulnerable* group (examples forgotten under a proxy harmful fine-tune) and
the rest, and trains with group distributionally robust sampling plus sharpness-aware steps (official code:
ChanLiang/VAA@e00cbf4 ``trainer.py::DROSamplingTrainer``):

- each step's batch comes from the vulnerable group with probability ``p`` (start 0.5), else from the rest;
- after the step, with the batch loss ``L``: vulnerable -> ``p1 = p * exp(eta * L / p)``, ``p2 = 1 - p``; other
  -> ``p1 = p``, ``p2 = (1 - p) * exp(eta * L / (1 - p))``; ``p = clip(p1 / (p1 + p2), 0.1, 0.9)``;
- with probability ``lambda_t = lambda * progress`` (the official linear schedule, epoch / epochs) the step is a
  SAM step: gradient at ``w``, weights moved to ``w + rho * g / (||g|| + 1e-7)``, the training pass there, the
  weights restored; only the perturbed gradient is used.

The official repository ships the vulnerable group as a fixed index list (``grouping/vulnerable.json``) without
the code that made it. Here it is built from the paper's definition [inferred procedure]: an aligned proxy model
(``proxy_model``, default the shipped aligned adapter) is fine-tuned for ``proxy_steps`` steps on the defense's
harmful pairs (never the attacks' data); each alignment example's loss is measured before and after; the
``vulnerable_share`` of examples whose loss rose most form the vulnerable group. The groups are written to the run
directory (``vaa_groups.json``) with the losses.

Defaults: ``rho`` = 0.4, ``lambda`` = 1, ``eta`` = 0.007, ``p`` from 0.5 (``vaa_pipeline_llama.sh``); training is the
shipped aligned recipe (the paper: 5 epochs at lr 1e-4, batch 8, constant schedule).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HookedAlignment, HookedAlignmentConfig
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook

VULNERABLE, OTHER = "vaa-vulnerable", "vaa-other"
GROUPS_FILE = "vaa_groups.json"


class VAAConfig(HookedAlignmentConfig):
    """VAA: group-DRO sampling over vulnerable / other alignment examples, with SAM steps."""

    rho: float = Field(0.4, gt=0.0, le=100.0, description="SAM radius (normalised gradient step).")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="lambda: SAM probability at the end of training (linear ramp).")
    eta: float = Field(0.007, gt=0.0, le=10.0, description="Step size of the group-weight (p) update.")
    p_init: float = Field(0.5, ge=0.1, le=0.9, description="Initial probability of drawing the vulnerable group.")
    proxy_model: str = Field(
        "smollm2-135m-aligned",
        description="An aligned version of the model being defended, fine-tuned on harmful pairs to find the "
        "vulnerable examples (must share the base model).",
    )
    proxy_steps: int = Field(20, ge=1, description="Steps of the proxy harmful fine-tune.")
    proxy_learning_rate: float = Field(5e-4, gt=0.0, description="Learning rate of the proxy harmful fine-tune.")
    vulnerable_share: float = Field(
        0.3, gt=0.0, lt=1.0, description="Share of alignment examples (largest loss increase) in the vulnerable group."
    )


def update_group_weight(p: float, loss: float, eta: float, vulnerable: bool) -> float:
    """VAA's group-DRO update of ``p`` (probability of the vulnerable group) after a batch with loss ``loss``."""
    if vulnerable:
        p1, p2 = p * math.exp(eta * loss / p), 1.0 - p
    else:
        p1, p2 = p, (1.0 - p) * math.exp(eta * loss / (1.0 - p))
    return min(max(p1 / (p1 + p2), 0.1), 0.9)


class GroupDROSampling(TrainingHook):
    """VAA's sampler and SAM steps as a training hook (see the module docstring)."""

    name = "vaa"

    def __init__(self, rho: float, lam: float, eta: float, p_init: float) -> None:
        self.rho, self.lam, self.eta, self.p = rho, lam, eta, p_init
        self.group = VULNERABLE
        self.sam_steps = 0
        self._move: Any = None

    def setup(self, ctx: HookContext) -> None:
        """One cycling stream per group."""
        self.ctx = ctx
        self._streams: dict[str, Iterator[Batch]] = {
            g: ctx.batches(g, seed=ctx.config.seed + i) for i, g in enumerate((VULNERABLE, OTHER))
        }

    def substitute_batch(self, inputs: Batch) -> Batch:
        """Draw this micro-batch's group (vulnerable with probability ``p``) and take its next batch."""
        from tunesec.training.steps import step_rng

        rng = step_rng(self.ctx.config.seed, self.ctx.clock, "vaa-group")
        self.group = VULNERABLE if rng.random() < self.p else OTHER
        return next(self._streams[self.group])

    def before_step(self, model: Any, inputs: Batch) -> None:
        """With probability ``lambda * progress``: move the weights to the SAM point for the training pass."""
        from tunesec.training.steps import Perturbation, gradient, step_rng, trainable_parameters, unit_step

        rng = step_rng(self.ctx.config.seed, self.ctx.clock, "vaa-sam")
        if rng.random() >= self.lam * self.ctx.clock.progress:
            return
        params = [p for _, p in trainable_parameters(model)]
        g = gradient(self.ctx.lm_loss(model, inputs), params)
        self._move = Perturbation(params, g, unit_step(g, self.rho))
        self.sam_steps += 1

    def after_step(self, model: Any) -> None:
        """Restore the weights (the gradient stays the perturbed one); update ``p`` with this batch's loss."""
        if self._move is not None:
            self._move.restore()
            self._move = None
        self.p = update_group_weight(self.p, self.ctx.last_loss, self.eta, self.group == VULNERABLE)

    def teardown(self, model: Any) -> None:
        """Restore weights left perturbed by a failed step."""
        if self._move is not None:
            self._move.restore()
            self._move = None

    def state_dict(self) -> dict[str, Any]:
        """The group weight and the SAM-step count."""
        return {"p": self.p, "sam_steps": self.sam_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the group weight."""
        self.p = float(state["p"])
        self.sam_steps = int(state.get("sam_steps", 0))


def check_proxy(proxy_model: str, model: ModelRef | str) -> ModelRef:
    """The proxy's ref; a usage error when its base weights are not the defended model's."""
    from tunesec.attacks.base import parse_ref, root_base_spec

    proxy, target = parse_ref(proxy_model), parse_ref(model)
    if root_base_spec(proxy) != root_base_spec(target):
        raise UsageError(
            f"proxy_model {proxy_model!r}: its base is {root_base_spec(proxy)!r}, not the defended model's "
            f"{root_base_spec(target)!r}; give an aligned version of the model being defended"
        )
    return proxy


def vulnerable_groups(
    config: VAAConfig,
    model: ModelRef | str,
    data: Sequence[Example],
    harmful: Sequence[Example],
    out_dir: Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Split ``data`` into vulnerable / other by loss increase under a proxy harmful fine-tune (module docstring).

    Returns the content of ``vaa_groups.json``: the vulnerable ids, every example's loss before and after, and
    the proxy run's settings. A file already in ``out_dir`` (a resumed run) is read back instead.
    """
    from tunesec.attacks.base import load_for_training
    from tunesec.store.atomic import atomic_write_json
    from tunesec.training import TrainConfig, train
    from tunesec.training.steps import example_losses

    saved = out_dir / GROUPS_FILE
    if saved.is_file():
        return dict(json.loads(saved.read_text(encoding="utf-8")))
    proxy = check_proxy(config.proxy_model, model)
    recipe = config.alignment.training
    loaded = load_for_training(proxy, method="lora")
    before = example_losses(loaded.model, loaded.tokenizer, data, max_seq_len=recipe.max_seq_len)
    proxy_cfg = TrainConfig(
        method="lora",
        lora_r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        learning_rate=config.proxy_learning_rate,
        max_steps=config.proxy_steps,
        per_device_batch_size=recipe.per_device_batch_size,
        max_seq_len=recipe.max_seq_len,
        save_steps=0,
        seed=recipe.seed,
    )
    result = train(loaded, list(harmful), proxy_cfg, out_dir=out_dir / "vaa-proxy", progress=progress)
    after = example_losses(result.model, loaded.tokenizer, data, max_seq_len=recipe.max_seq_len)
    rise = sorted(((after[i] - before[i], i) for i in before if i in after), reverse=True)
    n_vulnerable = max(1, round(config.vulnerable_share * len(rise)))
    groups = {
        "vulnerable": sorted(i for _, i in rise[:n_vulnerable]),
        "loss_before": before,
        "loss_after": after,
        "proxy": {
            "model": config.proxy_model,
            "steps": config.proxy_steps,
            "learning_rate": config.proxy_learning_rate,
        },
    }
    atomic_write_json(saved, groups)
    return groups


@register(
    "defense",
    "vaa",
    description="Vulnerability-aware alignment: group-DRO sampling of forgettable examples + SAM (rho, lambda, eta).",
    stage="alignment",
    paper="Chen et al. 2025, Vulnerability-Aware Alignment, arXiv 2506.03850",
    threat_model="fine-tuning-api",
    needs_harmful=True,
)
class VAA(HookedAlignment):
    """VAA (see the module docstring)."""

    name = "vaa"
    config_class = VAAConfig
    needs_harmful = True

    trains_on_harmful = False  # the harmful pairs drive the proxy fine-tune only

    def preflight(self, model: ModelRef | str) -> None:
        """The proxy must be an aligned version of the model being defended (same base weights)."""
        assert isinstance(self.config, VAAConfig)
        check_proxy(self.config.proxy_model, model)

    def prepare(
        self,
        model: ModelRef | str,
        out_dir: Path,
        data: Sequence[Example],
        harmful: Sequence[Example],
        *,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Build the vulnerable / other groups with the proxy harmful fine-tune."""
        assert isinstance(self.config, VAAConfig)
        groups = vulnerable_groups(self.config, model, data, harmful, out_dir, progress=progress)
        vulnerable = set(groups["vulnerable"])
        self._groups = {
            VULNERABLE: [e for e in data if e.id in vulnerable],
            OTHER: [e for e in data if e.id not in vulnerable],
        }
        if not self._groups[OTHER] or not self._groups[VULNERABLE]:
            raise UsageError("vulnerable_share: one of the two groups is empty; choose a share between them")
        return {"vaa_groups": {"vulnerable": len(self._groups[VULNERABLE]), "other": len(self._groups[OTHER])}}

    def extra_datasets(self, harmful: Sequence[Example], data: Sequence[Example]) -> dict[str, list[Example]]:
        """The two groups, which the sampler draws every batch from."""
        return dict(self._groups)

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the group-DRO sampler with SAM steps."""
        assert isinstance(self.config, VAAConfig)
        c = self.config
        return [GroupDROSampling(c.rho, c.lam, c.eta, c.p_init)]
