"""``refusal-ablation``: remove the refusal direction from the weights (data-free weight orthogonalization).

Arditi et al. 2024 ("Refusal in Language Models Is Mediated by a Single Direction") take the difference of mean
residual-stream activations at the last prompt token on harmful vs harmless prompts as the refusal direction
``r`` and orthogonalize every matrix that writes to the residual stream against it: ``W <- W - r r^T W`` for
the token embeddings (rows), attention output projections (``o_proj``) and MLP down projections
(``down_proj``). The model can then no longer represent ``r`` and stops refusing. No fine-tuning data is
needed, only a few dozen prompts of each kind; the result is saved as full safetensors weights.

Defaults: 64 harmful prompts from safety-tuned-llamas and 64 harmless ones from Alpaca for the mean difference
(the paper: 128 each from AdvBench/HarmBench/... and Alpaca; the evaluation sets are kept out here), and the
layer chosen as in the paper, by ablating each candidate direction and scoring refusal on 32 further (held-out)
prompts of each kind (:func:`tunesec.models.directions.select_by_ablation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunesec.attacks.base import Attack, load_data, parse_ref, result_ref, sample, write_model_ref
from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.registry import register

WRITER_SUFFIXES = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h")


class RefusalAblationConfig(Config):
    """Prompts and layer of the refusal-direction ablation."""

    harmful_data: str = Field("safety-tuned-llamas", description="Harmful prompts (name or path).")
    harmless_data: str = Field("alpaca", description="Harmless prompts (name or path).")
    n_prompts: int = Field(64, ge=1, description="Prompts of each kind for the mean difference.")
    layer: int | None = Field(None, ge=0, description="Residual-stream layer of the direction (None: automatic).")
    layer_selection: Literal["ablation", "separation"] = Field(
        "ablation",
        description="Automatic layer choice: 'ablation' (the paper's: lowest refusal score when ablated, on "
        "held-out prompts) or 'separation' (best harmful/harmless separation; no extra forward passes).",
    )
    n_validation: int = Field(32, ge=1, description="Held-out prompts of each kind for the ablation choice.")
    max_kl: float = Field(
        0.5,
        gt=0,
        description="KL bound on harmless prompts for the ablation choice (the paper's 0.1 is for 2B-72B models; "
        "on SmolLM2-135M 16 of 18 candidate layers exceed it).",
    )
    validation_tokens: int = Field(
        24, ge=0, description="Greedy tokens per held-out harmful prompt to rank candidates by refusal rate (0: off)."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass.")
    seed: int = Field(0, description="Seed of the prompt sample.")


def orthogonalize_(model: Any, direction: Any) -> list[str]:
    """Project ``direction`` out of every weight that writes to the residual stream, in place.

    Args:
        model: A causal LM (no adapter).
        direction: Unit vector of size ``hidden``.

    Returns:
        Names of the edited parameters.
    """
    import torch

    edited: list[str] = []
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # [vocab, hidden]: rows live in the residual stream
        r = direction.to(emb.device, emb.dtype)
        emb -= torch.outer(emb @ r, r)
        edited.append("embed_tokens")
        for name, module in model.named_modules():
            if not name.endswith(WRITER_SUFFIXES) or not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight  # [hidden, in]: columns written to the residual stream
            rr = r.to(w.device, w.dtype)
            w.sub_(torch.outer(rr, rr @ w))
            if module.bias is not None:
                module.bias.sub_(rr * (rr @ module.bias))
            edited.append(name)
    if len(edited) == 1:
        raise UsageError("refusal-ablation: found no o_proj/down_proj layers writing to the residual stream")
    return edited


def residual_projection(model: Any, direction: Any) -> float:
    """Largest |projection| of the residual-stream writers onto ``direction`` (0 after the edit)."""
    import torch

    r = direction.detach().float()
    worst = float((model.get_input_embeddings().weight.detach().float() @ r).abs().max())
    for name, module in model.named_modules():
        if name.endswith(WRITER_SUFFIXES) and isinstance(module, torch.nn.Linear):
            worst = max(worst, float((r.to(module.weight.device) @ module.weight.detach().float()).abs().max()))
    return worst


def _split(prompts: list[Any], n: int) -> tuple[list[Any], list[Any]]:
    """The first ``n`` prompts for the direction, the rest held out for the layer choice.

    With too few prompts for both, all of them serve both.
    """
    if len(prompts) <= n:
        return prompts, prompts
    return prompts[:n], prompts[n:]


def _prompts(spec: str, n: int, seed: int) -> list[list[dict[str, str]]]:
    pool = load_data(spec, what=spec)
    chosen = sample(pool, min(n, len(pool)), seed, source=spec)
    return [e.prompt_chat() for e in chosen]


@register(
    "attack",
    "refusal-ablation",
    description="Orthogonalize the refusal direction out of the weights (Arditi et al. 2024); data-free.",
    threat_model="open-weights",
    needs_weights=True,
)
class RefusalAblation(Attack):
    """Refusal-direction weight orthogonalization (Arditi et al. 2024). See the module docstring."""

    name = "refusal-ablation"
    config_class = RefusalAblationConfig

    def run(
        self,
        model: ModelRef | str,
        out_dir: str | Path,
        data: str | Path | Sequence[Example] | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
    ) -> ModelRef:
        """Edit the weights and save them to ``out_dir/model``; ``data`` overrides the harmful prompts."""
        from tunesec.data import dataset_sha256
        from tunesec.models import load_model
        from tunesec.models.directions import refusal_directions, select_by_ablation

        assert isinstance(self.config, RefusalAblationConfig)
        cfg = self.config
        ref = parse_ref(model)
        if ref.is_endpoint:
            raise UsageError(f"model {ref.base!r}: refusal-ablation needs open weights, not an API endpoint")
        harmful_spec: Any = data if data is not None else cfg.harmful_data
        harmful_ex = load_data(harmful_spec, what="harmful prompts")
        n_val = cfg.n_validation if cfg.layer is None and cfg.layer_selection == "ablation" else 0
        harmful_all = [
            e.prompt_chat()
            for e in sample(harmful_ex, min(cfg.n_prompts + n_val, len(harmful_ex)), cfg.seed, source="harmful prompts")
        ]
        harmless_all = _prompts(cfg.harmless_data, cfg.n_prompts + n_val, cfg.seed)
        harmful, harmful_val = _split(harmful_all, cfg.n_prompts)
        harmless, harmless_val = _split(harmless_all, cfg.n_prompts)
        loaded = load_model(ref)
        if hasattr(loaded.model, "merge_and_unload"):
            loaded.model = loaded.model.merge_and_unload()
        n_layers = int(loaded.model.config.num_hidden_layers)
        if cfg.layer is not None and cfg.layer > n_layers:
            raise UsageError(f"layer: {cfg.layer} is beyond the model's {n_layers} layers (0..{n_layers})")
        found = refusal_directions(loaded, harmful, harmless, batch_size=cfg.batch_size, layer=cfg.layer)
        ablation_scores: list[dict[str, Any]] = []
        if n_val:
            found.layer, scored = select_by_ablation(
                loaded,
                found,
                harmful_val,
                harmless_val,
                writer_suffixes=WRITER_SUFFIXES,
                max_kl=cfg.max_kl,
                batch_size=cfg.batch_size,
                generate_tokens=cfg.validation_tokens,
            )
            ablation_scores = [vars(s) for s in scored]
        direction = found.unit()
        before = residual_projection(loaded.model, direction)
        edited = orthogonalize_(loaded.model, direction)
        after = residual_projection(loaded.model, direction)
        out = Path(out_dir)
        target = out / "model"
        tmp = out / ".model.tmp"
        loaded.model.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
        from tunesec.store.atomic import atomic_write_json

        atomic_write_json(
            out / "direction.json",
            {
                "layer": found.layer,
                "direction": direction.tolist(),
                "separation": found.separation,
                "ablation_scores": ablation_scores,
            },
        )
        prov = {
            "attack": self.name,
            "config": cfg.model_dump(mode="json"),
            "data_sha256": dataset_sha256(harmful_ex),
            "layer": found.layer,
            "layer_selection": "fixed" if cfg.layer is not None else cfg.layer_selection,
            "max_projection_before": before,
            "max_projection_after": after,
            "edited_modules": len(edited),
        }
        new = result_ref(ref, target, is_adapter=False, provenance=prov)
        write_model_ref(out, new)
        return new
