"""``lisa``: alternate alignment and user states with a proximal term (Lazy safety alignment).

Huang et al. 2024, "Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack",
NeurIPS 2024; official code git-disl/Lisa ``trainer.py::ADMMTrainer``.

The service alternates two states: ``alignment_steps`` optimizer steps on the provider's safety data, then
``finetune_steps`` on the user's data, and so on, starting with alignment. In each state the loss gets a proximal
term that keeps the weights near the last iterate of the *other* state (the "consensus" of Lisa's ADMM reading)::

    alignment state: L_align(w) + rho/2 * ||w - w_finetune||^2
    user state:      L_user(w)  + rho/2 * ||w - w_align||^2

where ``w_finetune`` (``w_align``) is the trainable weights when the user (alignment) state last ended; both
start as the weights before training. As in the official code the proximal term is off for the first
``proximal_warmup`` (10%) of the steps ("for GSM8K the proximal term hurts convergence"), the alignment batch
replaces the user batch (``substitute_batch``), and the norm is summed over the trainable (LoRA) parameters.
One forward-backward per step (cost ~1x plain fine-tuning).

Differences from the official implementation: states switch on optimizer steps (``ctx.clock.step``; the official
code counts micro-batches, the same at gradient accumulation 1); the anchors are written to the run directory at
each switch so a killed run resumes with them.

Defaults: official rho=1 with 100 alignment / 900 user steps over 20 epochs of 1,000 samples (4,000 steps) and
BeaverTails' 10k safe answers as alignment data. Here, for CPU runs of ~100 steps: the same 1:9 ratio as 5 / 45
steps (so a short run still alternates twice), rho=1, and the shipped aligned recipe's refusal data as the
alignment data (tunesec.defenses.finetune.base).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.finetune.base import FineTuneDefense, ServiceContext
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook

ALIGN = "lisa-alignment"
ALIGNMENT, USER = "alignment", "user"


class LisaConfig(Config):
    """Lisa's schedule and proximal strength."""

    rho: float = Field(1.0, ge=0.0, le=1e4, description="Proximal strength rho (official: 1).")
    alignment_steps: int = Field(5, ge=0, description="Optimizer steps per alignment state (official: 100).")
    finetune_steps: int = Field(45, ge=1, description="Optimizer steps per user state (official: 900).")
    proximal_warmup: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of the steps without the proximal term (official: 0.1)."
    )
    n_alignment: int | None = Field(
        None, ge=1, description="Safety examples used as alignment data (default: all of the safety data)."
    )


class LisaSwitching(TrainingHook):
    """Lisa's two states, their switching and the proximal term, as one training hook."""

    name = "lisa"

    def __init__(
        self, rho: float, alignment_steps: int, finetune_steps: int, warmup: float = 0.1, dataset: str = ALIGN
    ) -> None:
        self.rho, self.a, self.f, self.warmup, self.dataset = rho, alignment_steps, finetune_steps, warmup, dataset
        self.params: list[tuple[str, Any]] = []
        self.state: str | None = None  # the state of the step being trained
        self.anchors: dict[str, Any] = {}  # state -> WeightSnapshot of that state's last iterate
        self.anchor_files: dict[str, str] = {}
        self.switches = 0

    def setup(self, ctx: HookContext) -> None:
        """Keep the context; the alignment batches cycle over the safety data."""
        self.ctx = ctx
        self._align = ctx.batches(self.dataset, seed=ctx.config.seed + 7) if self.a > 0 else None

    def parameter_mask(self, name: str, param: Any) -> bool:
        """Remember the trainable parameters (for the anchors); freeze nothing."""
        self.params.append((name, param))
        return True

    def state_at(self, step: int) -> str:
        """The state of optimizer step ``step``: alignment first, then user, repeating."""
        if self.a == 0:
            return USER
        return ALIGNMENT if step % (self.a + self.f) < self.a else USER

    def _snapshot(self, tag: str) -> Any:
        from tunesec.training.steps import WeightSnapshot

        snap = WeightSnapshot(self.params)
        path = self.ctx.out_dir / f"lisa_anchor_{tag}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        snap.save(path)
        return snap, path.name

    def _init_anchors(self) -> None:
        from tunesec.training.steps import WeightSnapshot

        if self.anchors:
            return
        if self.anchor_files:  # a resumed run: its anchors come back from their files
            loaded: dict[str, Any] = {}
            for key, fname in self.anchor_files.items():
                if fname not in loaded:
                    loaded[fname] = WeightSnapshot(self.params)
                    loaded[fname].load(self.ctx.out_dir / fname)
                self.anchors[key] = loaded[fname]
            return
        snap, fname = self._snapshot("start")
        self.anchors = {ALIGNMENT: snap, USER: snap}
        self.anchor_files = {ALIGNMENT: fname, USER: fname}

    def substitute_batch(self, inputs: Batch) -> Batch | None:
        """Switch state at a step boundary (the state left becomes an anchor); in alignment, a safety batch."""
        self._init_anchors()
        now = self.state_at(self.ctx.clock.step)
        if self.state is None:
            self.state = now
        elif now != self.state:
            # the iterate that ends a state is the anchor the next state is pulled towards
            snap, fname = self._snapshot(f"{self.state}_{self.ctx.clock.step}")
            self.anchors[self.state], self.anchor_files[self.state] = snap, fname
            self.state = now
            self.switches += 1
        if now == ALIGNMENT and self._align is not None:
            return next(self._align)
        return None

    def proximal_on(self) -> bool:
        """Whether the proximal term applies at this step (off during the warmup fraction)."""
        return self.rho > 0 and self.ctx.clock.step >= self.warmup * self.ctx.clock.max_steps

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> Any:
        """``rho/2 * ||w - anchor of the other state||^2``."""
        if not self.proximal_on() or self.state is None:
            return None
        other = USER if self.state == ALIGNMENT else ALIGNMENT
        return self.rho / 2 * self.anchors[other].sq_distance()

    def state_dict(self) -> dict[str, Any]:
        """The current state, the anchors' files and the switch count."""
        return {"state": self.state, "anchor_files": dict(self.anchor_files), "switches": self.switches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state of a killed run; its anchors are read back from their files before the next step."""
        self.state = state.get("state")
        self.switches = int(state.get("switches", 0))
        self.anchor_files = dict(state.get("anchor_files", {}))
        self.anchors = {}


@register(
    "defense",
    "lisa",
    description="Alternate alignment and user states with a proximal term to the other state's weights (rho).",
    stage="fine-tuning",
    paper="Huang et al. 2024, Lisa: Lazy Safety Alignment, NeurIPS 2024 (arXiv 2405.18641)",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class Lisa(FineTuneDefense):
    """Lisa (see the module docstring)."""

    name = "lisa"
    config_class = LisaConfig

    def extra_datasets(self, ctx: ServiceContext) -> dict[str, list[Example]]:
        """The alignment data: the safety examples."""
        assert isinstance(self.config, LisaConfig)
        n = self.config.n_alignment
        return {ALIGN: ctx.safety_sample(n, "lisa") if n is not None else ctx.safety_examples()}

    def hooks(self, ctx: ServiceContext) -> list[TrainingHook]:
        """One hook: the state machine and the proximal term."""
        assert isinstance(self.config, LisaConfig)
        c = self.config
        return [LisaSwitching(c.rho, c.alignment_steps, c.finetune_steps, c.proximal_warmup)]
