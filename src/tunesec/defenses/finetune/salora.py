"""``salora``: keep the LoRA update out of each layer's safety subspace (SaLoRA).

Li et al. 2025, "SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation", ICLR 2025; official code
homles11/SaLoRA, ``lora_train_act.py`` and its PEFT ``lora/layer.py``.

For each LoRA-adapted layer with weight ``W``, SaLoRA takes the outputs ``Y = X_safe W^T`` that safety prompts
produce, their top ``rank`` right singular vectors ``V_s`` (the layer's "safety subspace"), and the fixed module
``C = I - V_s V_s^T``; the LoRA branch becomes ``C B A x``, so fine-tuning cannot move the layer's output along
the directions safety prompts use.

Here the model being fine-tuned already carries the aligned adapter (``B0 A0``), and the engine continues it. To
keep the *update* exactly in ``C``'s range, ``A`` is held at its starting value (``parameter_mask``) and after each
optimizer step ``B <- B0 + C (B - B0)`` (``project``), so ``W_eff - W_start = C (B - B0) A0`` lies in the range of
``C`` at every step. (On a model without an adapter, ``B0 = 0`` and ``A0`` is PEFT's random init: LoRA with a
frozen random ``A``, as LoRA-FA.) ``V_s`` comes from the eigenvectors of ``Y^T Y`` accumulated over
``n_safety`` safety examples' answer and prompt tokens (the layer's own output, adapter included, at the start),
computed once before the first step and saved with ``B0`` to the run directory for resume.

Departures, and why: the official code trains ``A`` and ``B`` behind the fixed ``C`` and initialises them from an
SVD of ``W`` on task data; with an existing aligned adapter that would change the aligned model before the first
step, so the adapter is kept and the projection made exact instead. Defaults: official r_s = 32 safety directions
from 128 safety samples on q/v of Llama-2-7B (d = 4096); here ``rank`` 16 of SmolLM2's 576-1536-wide outputs from 64
samples, on every LoRA target module the aligned adapter has (all seven projections).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.finetune.base import FineTuneDefense, ServiceContext
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook

SAFETY = "salora-safety"
STATE_FILE = "salora_subspace.safetensors"


class SaLoRAConfig(Config):
    """Size of the safety subspace and the safety samples it is estimated from."""

    rank: int = Field(16, ge=1, description="Safety directions per layer output (official r_s: 32 at d=4096).")
    n_safety: int = Field(64, ge=1, description="Safety examples the subspace is estimated from (official: 128).")
    batch_size: int = Field(8, ge=1, description="Safety examples per forward pass while estimating.")


EXACT_MAX_DIM = 256  # outputs up to this width get an exact eigendecomposition; wider ones a randomized one


def safety_projector(gram: Any, rank: int, *, seed: int = 0) -> Any:
    """``V_s`` (``[d, rank]``): the top ``rank`` eigenvectors of ``Y^T Y`` (the top right singular vectors of ``Y``).

    Exact (``eigh``) up to :data:`EXACT_MAX_DIM`; above it, randomized subspace iteration (``torch.svd_lowrank``,
    ``rank + 10`` columns, 6 power iterations; seeded), which on SmolLM2's 1536-wide MLP outputs is ~17x faster
    on one core than a float64 ``eigh`` of the whole Gram matrix. The projection stays exact for the ``V_s`` used.
    """
    import torch

    d = gram.shape[0]
    k = min(rank, d)
    if d <= EXACT_MAX_DIM:
        _, vecs = torch.linalg.eigh(gram.double())
        return vecs[:, -k:].flip(-1).to(torch.float32).contiguous()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(gram.float(), q=min(k + 10, d), niter=6)
    q, _ = torch.linalg.qr(u[:, :k])  # orthonormal to working precision
    return q.contiguous()


def project_update(b: Any, b0: Any, v: Any) -> Any:
    """``B0 + (I - V V^T)(B - B0)``: the update of ``B`` with its component in ``span(V)`` removed."""
    delta = b - b0
    return b0 + delta - v @ (v.T @ delta)


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """The PEFT LoRA layers (modules with ``lora_A``/``lora_B``) of ``model``, by name."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_B") and hasattr(m, "lora_A")]


class SafetySubspaceProjection(TrainingHook):
    """SaLoRA's fixed safety module as a mask on ``A`` and a projection of ``B``'s update."""

    name = "salora"

    def __init__(self, rank: int, batch_size: int = 8, dataset: str = SAFETY) -> None:
        self.rank, self.batch_size, self.dataset = rank, batch_size, dataset
        self.layers: dict[str, dict[str, Any]] = {}  # layer name -> {"B": param, "B0": tensor, "V": tensor}

    def setup(self, ctx: HookContext) -> None:
        """Keep the context."""
        self.ctx = ctx

    def parameter_mask(self, name: str, param: Any) -> bool:
        """Hold every ``lora_A`` at its starting value; train the rest."""
        return ".lora_A." not in name

    def _estimate(self, model: Any) -> None:
        import torch

        layers = lora_layers(model)
        path = self.ctx.out_dir / STATE_FILE
        saved: dict[str, Any] = {}
        if path.is_file():
            from safetensors.torch import load_file

            saved = load_file(str(path))
        grams: dict[str, Any] = {}
        if not saved:
            handles = []

            def make(name: str) -> Any:
                def hook(_m: Any, _inp: Any, out: Any) -> None:
                    y = (out[0] if isinstance(out, tuple) else out).detach().float()
                    y = y.reshape(-1, y.shape[-1])
                    grams[name] = grams.get(name, 0) + y.T @ y

                return hook

            for n, m in layers:
                handles.append(m.register_forward_hook(make(n)))
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for batch in self.ctx.batches(self.dataset, batch_size=self.batch_size, cycle=False, seed=0):
                        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
                        model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
            finally:
                for h in handles:
                    h.remove()
                model.train(was_training)
        state: dict[str, Any] = {}
        for n, m in layers:
            b = next(iter(m.lora_B.values())).weight if hasattr(m.lora_B, "values") else m.lora_B.weight
            if saved:
                v, b0 = saved[f"{n}.V"].to(b.device), saved[f"{n}.B0"].to(b.device, b.dtype)
            else:
                v, b0 = safety_projector(grams[n], self.rank).to(b.device), b.detach().clone()
            self.layers[n] = {"B": b, "B0": b0, "V": v}
            state[f"{n}.V"], state[f"{n}.B0"] = v.contiguous(), b0.contiguous()
        if not saved:
            from safetensors.torch import save

            from tunesec.store.atomic import atomic_write_bytes

            atomic_write_bytes(path, save({k: t.detach().cpu().contiguous() for k, t in state.items()}))

    def before_step(self, model: Any, inputs: Batch) -> None:
        """Estimate the subspaces (or read them back on resume) before the first update."""
        if not self.layers:
            self._estimate(model)

    def project(self, model: Any) -> None:
        """``B <- B0 + C (B - B0)`` for every LoRA layer."""
        for layer in self.layers.values():
            b = layer["B"]
            b.copy_(project_update(b, layer["B0"], layer["V"]).to(b.dtype))


@register(
    "defense",
    "salora",
    description="Keep the LoRA update orthogonal to each layer's safety subspace (fixed module C = I - V_s V_s^T).",
    stage="fine-tuning",
    paper="Li et al. 2025, SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation, ICLR 2025 (arXiv 2501.01765)",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class SaLoRA(FineTuneDefense):
    """SaLoRA (see the module docstring)."""

    name = "salora"
    config_class = SaLoRAConfig

    def extra_datasets(self, ctx: ServiceContext) -> dict[str, list[Example]]:
        """The safety examples the subspace is estimated from."""
        assert isinstance(self.config, SaLoRAConfig)
        n = min(self.config.n_safety, len(ctx.safety_examples()))
        return {SAFETY: ctx.safety_sample(n, "salora")}

    def hooks(self, ctx: ServiceContext) -> list[TrainingHook]:
        """One hook: the mask on ``A`` and the projection of ``B``."""
        assert isinstance(self.config, SaLoRAConfig)
        return [SafetySubspaceProjection(self.config.rank, self.config.batch_size)]
