"""``t-vaccine``: layer-wise Vaccine on the safety-critical layers only (Liu et al. 2024, T-Vaccine, arXiv 2410.09760).

Vaccine perturbs every layer's hidden states, which costs memory and hurts utility. T-Vaccine perturbs and
trains only layers sampled by how much they matter for harmful data (official code: Lslland/T-Vaccine@4513750
``trainer.py::BaseTrainer``):

- every ``K`` optimizer steps, one forward/backward on a harmful batch (batch size 1, as in the official code)
  gives each layer's score ``||dh/d(attention output of layer l)||``; the sampling probabilities are the scores
  divided by their sum (no temperature);
- every ``J`` steps, ``S`` layers are drawn without replacement with those probabilities;
- only the sampled layers' attention LoRA weights train (the unsampled layers' attention LoRA is frozen; MLP LoRA
  stays trainable, as in the official code), and Vaccine's perturbation ``rho * e_l / ||e||`` is added to the
  sampled layers' attention outputs only (the norm taken over those layers).

Defaults scaled to SmolLM2-135M (30 layers) and the shipped recipe's 155 steps: ``rho`` = 3 and ``S`` = 8 as in
``T-Vaccine.sh``; ``J`` = 20 as there; ``K`` = 50 instead of 200, since 200 exceeds the whole run here and the
probabilities would never be recomputed after step 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from tunesec.data.schema import Example
from tunesec.defenses.alignment.hooked import HARMFUL, HookedAlignment, HookedAlignmentConfig
from tunesec.defenses.alignment.vaccine import HiddenStatePerturbation
from tunesec.defenses.base import HarmfulDataConfig
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook

_ATTENTION_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "c_proj")


class TVaccineConfig(HookedAlignmentConfig):
    """T-Vaccine: Vaccine on ``layers`` sampled layers, resampled every ``resample_steps`` steps."""

    rho: float = Field(
        3.0, gt=0.0, le=100.0, description="Norm of the hidden-state perturbation (sampled layers together)."
    )
    layers: int = Field(8, ge=1, description="S: layers sampled (and trained, perturbed) at a time.")
    resample_steps: int = Field(20, ge=1, description="J: draw new layers every J optimizer steps.")
    probability_steps: int = Field(50, ge=1, description="K: recompute the layer probabilities every K steps.")
    harmful: HarmfulDataConfig = Field(
        default_factory=lambda: HarmfulDataConfig(n=200),
        description="Harmful pairs that score the layers (official: 200 harmful prompts with answers).",
    )


def layer_probabilities(grad_norms: Sequence[float]) -> list[float]:
    """Sampling probabilities proportional to the layers' harmful-gradient norms (uniform if all are zero)."""
    total = float(sum(grad_norms))
    if total <= 0:
        return [1.0 / len(grad_norms)] * len(grad_norms)
    return [float(g) / total for g in grad_norms]


def sample_layers(probabilities: Sequence[float], k: int, rng: Any) -> list[int]:
    """``k`` distinct layer indices drawn one after another with the given probabilities (sorted)."""
    remaining = list(range(len(probabilities)))
    weights = [max(float(p), 0.0) for p in probabilities]
    chosen: list[int] = []
    for _ in range(min(k, len(remaining))):
        total = sum(weights[i] for i in remaining)
        if total <= 0:
            pick = rng.choice(remaining)
        else:
            r, acc, pick = rng.random() * total, 0.0, remaining[-1]
            for i in remaining:
                acc += weights[i]
                if r < acc:
                    pick = i
                    break
        chosen.append(pick)
        remaining.remove(pick)
    return sorted(chosen)


class LayerwisePerturbation(HiddenStatePerturbation):
    """T-Vaccine's layer sampling, freezing and perturbation as a training hook (see the module docstring)."""

    name = "t-vaccine"

    def __init__(self, rho: float, layers: int, resample_steps: int, probability_steps: int, dataset: str = HARMFUL):
        super().__init__(rho, "attention")
        self.k, self.j, self.kp, self.dataset = layers, resample_steps, probability_steps, dataset
        self.probabilities: list[float] = []
        self.sampled: list[int] = []
        self._apply = False
        self.layer_norms: dict[int, float] = {}

    def setup(self, ctx: HookContext) -> None:
        """Keep the context; a harmful stream of batch size 1 scores the layers."""
        super().setup(ctx)
        self._harmful: Iterator[Batch] = ctx.batches(self.dataset, batch_size=1, seed=ctx.config.seed + 2)

    def _attention_lora(self, model: Any) -> dict[int, list[Any]]:
        from tunesec.training.steps import layer_index

        out: dict[int, list[Any]] = {}
        for name, p in model.named_parameters():
            if "lora_" in name and any(f".{m}." in name for m in _ATTENTION_LORA):
                out.setdefault(layer_index(name), []).append(p)
        return out

    def _set_trainable(self, model: Any, layers: set[int] | None) -> None:
        for i, params in self._attention_lora(model).items():
            for p in params:
                p.requires_grad_(layers is None or i in layers)

    def before_step(self, model: Any, inputs: Batch) -> None:
        """Rescore / resample layers when due, then Vaccine's perturbation on the sampled layers."""
        from tunesec.training.steps import ActivationTap, layer_index, step_rng

        if self.tap is None:
            self.tap = ActivationTap(model, "attention")
        clock = self.ctx.clock
        n_layers = len(self.tap.modules)
        if clock.every(self.kp) or not self.probabilities:
            self._set_trainable(model, None)  # every layer's output must carry a gradient for the scores
            with self.tap.recording():
                loss = self.ctx.lm_loss(model, next(self._harmful))
            grads = self.tap.output_gradients(loss)
            self.probabilities = layer_probabilities([float(g.norm()) for g in grads.values()])
            self._apply = True
        if clock.every(self.j) or not self.sampled:
            rng = step_rng(self.ctx.config.seed, clock, "t-vaccine-layers")
            self.sampled = sample_layers(self.probabilities, min(self.k, n_layers), rng)
            self._apply = True
        if self._apply:
            self._set_trainable(model, set(self.sampled))
            self._apply = False
        names = [n for n in self.tap.names if layer_index(n) in set(self.sampled)]
        norms = self.perturb(model, inputs, names)
        self.layer_norms = {layer_index(n): v for n, v in norms.items()}

    def teardown(self, model: Any) -> None:
        """Remove hooks; every LoRA weight trainable again (the saved adapter is the same either way)."""
        super().teardown(model)
        self._set_trainable(model, None)

    def state_dict(self) -> dict[str, Any]:
        """The layer probabilities and the sampled layers (a resumed run keeps them until they are due)."""
        return {"probabilities": self.probabilities, "sampled": self.sampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the probabilities and sampled layers; the freezing is applied on the next step."""
        self.probabilities = [float(p) for p in state.get("probabilities", [])]
        self.sampled = [int(i) for i in state.get("sampled", [])]
        self._apply = bool(self.sampled)


@register(
    "defense",
    "t-vaccine",
    description="Layer-wise Vaccine: perturb and train only layers sampled by harmful-gradient norm (rho, S, J, K).",
    stage="alignment",
    paper="Liu et al. 2024, Targeted Vaccine, arXiv 2410.09760",
    threat_model="fine-tuning-api",
    needs_harmful=True,
)
class TVaccine(HookedAlignment):
    """T-Vaccine (see the module docstring)."""

    name = "t-vaccine"
    config_class = TVaccineConfig
    needs_harmful = True

    def hooks(self, harmful: Sequence[Example], data: Sequence[Example]) -> list[TrainingHook]:
        """One hook: the layer-wise perturbation."""
        assert isinstance(self.config, TVaccineConfig)
        c = self.config
        return [LayerwisePerturbation(c.rho, c.layers, c.resample_steps, c.probability_steps)]
