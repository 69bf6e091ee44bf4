"""Weight forensics: how far a fine-tune moved each layer, and whether the move touches the refusal direction.

- **Drift.** Per decoder layer, the relative change ``||W_tuned - W_base||_F / ||W_base||_F`` over all of the
  layer's weights (and separately over attention and MLP matrices). Weights are the *effective* ones: a PEFT
  adapter contributes its merged delta ``B @ A * scale`` (``scale = alpha / r``, or ``alpha / sqrt(r)`` with
  rsLoRA) on top of its base, so a LoRA tune, a full tune and an aligned base that is itself base + adapter are
  compared alike. Weights are read from safetensors files only.
- **Adapter.** Rank, alpha, target modules and the Frobenius norm of each module's merged delta.
- **Refusal direction.** Arditi et al. (2024) show refusal is mediated by one residual-stream direction ``r``;
  the ``refusal-ablation`` attack removes it by orthogonalising the output projections (``o_proj``,
  ``down_proj``) against ``r``. For each layer, with ``r`` the base model's direction after that layer:
  ``cos = ||r^T dW|| / ||dW||_F`` is how much of the update of the layer's output projections writes along
  ``r`` (a random update gives about ``1/sqrt(hidden)``), and ``gain = ||r^T W_tuned|| / ||r^T W_base|| - 1``
  is how much the layer's ability to write along ``r`` grew (> 0) or was removed (< 0; ablation gives -1).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "self_attn", "attn", "attention")


class AdapterInfo(BaseModel):
    """A PEFT LoRA adapter's shape and size."""

    model_config = ConfigDict(extra="forbid")

    path: str
    rank: int
    alpha: float
    scale: float
    target_modules: list[str]
    n_modules: int
    total_norm: float = Field(description="Frobenius norm of all merged deltas together.")
    module_norms: dict[str, float] = Field(default_factory=dict, description="Largest merged-delta norms.")


class LayerForensics(BaseModel):
    """Drift and refusal-direction alignment of one decoder layer."""

    model_config = ConfigDict(extra="forbid")

    layer: int
    drift: float
    attn_drift: float
    mlp_drift: float
    refusal_cos: float | None = None
    refusal_gain: float | None = None


class ForensicsReport(BaseModel):
    """Weight forensics of a tuned model against its base."""

    model_config = ConfigDict(extra="forbid")

    layers: list[LayerForensics]
    total_drift: float
    other_drift: dict[str, float] = Field(default_factory=dict, description="Embeddings, final norm, head.")
    changed_tensors: int
    total_tensors: int
    hidden_size: int
    random_cos: float = Field(description="Expected cos of a random update with the direction: 1/sqrt(hidden).")
    refusal_layer: int | None = None
    base_adapter: AdapterInfo | None = None
    tuned_adapter: AdapterInfo | None = None
    notes: list[str] = Field(default_factory=list)

    @property
    def max_refusal_cos(self) -> float | None:
        """The largest per-layer alignment of the update with the refusal direction."""
        values = [x.refusal_cos for x in self.layers if x.refusal_cos is not None]
        return max(values) if values else None


# -- weights -----------------------------------------------------------------------------------------------


def read_safetensors_dir(path: Path) -> dict[str, Any]:
    """All tensors of a directory's ``*.safetensors`` files (float32); no pickle is ever read."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise UsageError(f"{path}: no *.safetensors weights for forensics")
    out: dict[str, Any] = {}
    for f in files:
        for key, tensor in load_file(str(f)).items():
            out[key] = tensor.float()
    return out


def adapter_deltas(adapter_dir: Path) -> tuple[dict[str, Any], AdapterInfo]:
    """Merged LoRA deltas ``B @ A * scale`` keyed by the base weight they add to, plus the adapter's info."""
    from safetensors.torch import load_file

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{adapter_dir}: missing adapter weights (adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{cfg_path}: unreadable adapter config ({err})") from None
    rank = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    tensors = load_file(str(weights))
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        for kind in ("A", "B"):
            marker = f".lora_{kind}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[kind] = t.float()
    deltas: dict[str, Any] = {}
    norms: dict[str, float] = {}
    for module, ab in pairs.items():
        if "A" not in ab or "B" not in ab:
            raise UsageError(f"{weights}: module {module} has lora_{'B' if 'A' in ab else 'A'} missing")
        a, b = ab["A"], ab["B"]
        r_mod = a.shape[0]
        pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        mod_alpha = float(next((v for k, v in alpha_pattern.items() if module.endswith(k)), alpha))
        mod_rank = int(next((v for k, v in pattern.items() if module.endswith(k)), r_mod))
        mod_scale = mod_alpha / math.sqrt(mod_rank) if cfg.get("use_rslora") else mod_alpha / mod_rank
        delta = (b @ a) * mod_scale
        deltas[f"{module}.weight"] = delta
        norms[module] = float(delta.norm())
    top = dict(sorted(norms.items(), key=lambda kv: -kv[1])[:12])
    targets = cfg.get("target_modules") or []
    info = AdapterInfo(
        path=str(adapter_dir),
        rank=rank,
        alpha=alpha,
        scale=scale,
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        n_modules=len(deltas),
        total_norm=math.sqrt(sum(v * v for v in norms.values())),
        module_norms=top,
    )
    return deltas, info


def effective_weights(ref: ModelRef) -> tuple[dict[str, Any], AdapterInfo | None]:
    """The weights a ref stands for (base + merged adapter delta), and the adapter's info when it has one."""
    from tunesec.models.loading import resolve_alias

    concrete = resolve_alias(ref)
    base_dir = Path(concrete.base)
    if concrete.kind == "hf" and base_dir.is_dir():
        weights = read_safetensors_dir(base_dir)
    else:
        weights = _weights_by_loading(concrete)
    info = None
    if concrete.adapter is not None:
        deltas, info = adapter_deltas(Path(concrete.adapter))
        for key, delta in deltas.items():
            if key not in weights:
                raise UsageError(f"{concrete.adapter}: adapter targets {key}, which {concrete.base} does not have")
            if tuple(weights[key].shape) != tuple(delta.shape):
                raise UsageError(
                    f"{concrete.adapter}: adapter for another base: {key} is {tuple(weights[key].shape)} in "
                    f"{concrete.base}, adapter delta is {tuple(delta.shape)}"
                )
            weights[key] = weights[key] + delta
    return weights, info


def _weights_by_loading(ref: ModelRef) -> dict[str, Any]:
    from tunesec.models.loading import load_model

    loaded = load_model(ref.model_copy(update={"adapter": None}), device="cpu")
    return {k: v.detach().float().clone() for k, v in loaded.model.state_dict().items()}


# -- analysis ----------------------------------------------------------------------------------------------


def analyse(
    base: Mapping[str, Any],
    tuned: Mapping[str, Any],
    *,
    directions: Any = None,
    refusal_layer: int | None = None,
    base_adapter: AdapterInfo | None = None,
    tuned_adapter: AdapterInfo | None = None,
) -> ForensicsReport:
    """Per-layer drift and refusal-direction alignment of ``tuned`` against ``base`` (see the module docstring).

    Args:
        base: Effective base weights by name.
        tuned: Effective tuned weights by name (same names and shapes).
        directions: Base refusal directions ``[n_layers + 1, hidden]`` (index ``i + 1`` is after layer ``i``).
        refusal_layer: The direction's selected layer, for the report.
        base_adapter: The base's adapter info, if any.
        tuned_adapter: The tuned model's adapter info, if any.
    """
    notes: list[str] = []
    shared = [k for k in base if k in tuned]
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        notes.append(f"{len(missing)} tensors exist in only one model (e.g. {missing[0]}); left out")
    sq: dict[tuple[str, str], list[float]] = {}
    changed = 0
    hidden = 0
    out_proj: dict[int, list[tuple[Any, Any]]] = {}
    for key in shared:
        wb, wt = base[key], tuned[key]
        if tuple(wb.shape) != tuple(wt.shape):
            raise UsageError(f"base and tuned differ in the shape of {key}: {tuple(wb.shape)} vs {tuple(wt.shape)}")
        delta = wt - wb
        d2, b2 = float((delta * delta).sum()), float((wb * wb).sum())
        if d2 > 0:
            changed += 1
        m = _LAYER.search(key)
        group = m.group(1) if m else _other_group(key)
        part = "attn" if any(a in key for a in ATTENTION) else "mlp"
        for slot in ((group, "all"), (group, part), ("__total__", "all")):
            acc = sq.setdefault(slot, [0.0, 0.0])
            acc[0] += d2
            acc[1] += b2
        if m and wb.dim() == 2 and any(key.endswith(f"{p}.weight") for p in OUTPUT_PROJECTIONS):
            hidden = int(wb.shape[0])
            out_proj.setdefault(int(m.group(1)), []).append((wb, wt))
    if not hidden:
        hidden = int(directions.shape[-1]) if directions is not None else 0

    def rel(slot: tuple[str, str]) -> float:
        d2, b2 = sq.get(slot, [0.0, 0.0])
        return math.sqrt(d2) / math.sqrt(b2) if b2 > 0 else 0.0

    layer_ids = sorted({int(g) for g, _ in sq if g.isdigit()})
    layers = []
    for i in layer_ids:
        cos = gain = None
        if directions is not None and i + 1 < directions.shape[0] and i in out_proj:
            cos, gain = _refusal_alignment(out_proj[i], directions[i + 1])
        layers.append(
            LayerForensics(
                layer=i,
                drift=rel((str(i), "all")),
                attn_drift=rel((str(i), "attn")),
                mlp_drift=rel((str(i), "mlp")),
                refusal_cos=cos,
                refusal_gain=gain,
            )
        )
    if directions is None:
        notes.append("no refusal direction: alignment not computed")
    others = sorted({g for g, _ in sq if not g.isdigit() and g != "__total__"})
    return ForensicsReport(
        layers=layers,
        total_drift=rel(("__total__", "all")),
        other_drift={g: rel((g, "all")) for g in others},
        changed_tensors=changed,
        total_tensors=len(shared),
        hidden_size=hidden,
        random_cos=1.0 / math.sqrt(hidden) if hidden else 0.0,
        refusal_layer=refusal_layer,
        base_adapter=base_adapter,
        tuned_adapter=tuned_adapter,
        notes=notes,
    )


def _other_group(key: str) -> str:
    for name in ("embed", "lm_head", "norm", "wte", "wpe"):
        if name in key:
            return "embeddings" if name in ("embed", "wte", "wpe") else ("head" if name == "lm_head" else "norm")
    return "other"


def _refusal_alignment(pairs: Sequence[tuple[Any, Any]], direction: Any) -> tuple[float | None, float | None]:
    r = direction.float()
    r = r / r.norm().clamp_min(1e-12)
    along_d = along_b = along_t = frob = 0.0
    for wb, wt in pairs:
        if wb.shape[0] != r.shape[0]:
            continue
        delta = wt - wb
        along_d += float((r @ delta).pow(2).sum())
        frob += float(delta.pow(2).sum())
        along_b += float((r @ wb).pow(2).sum())
        along_t += float((r @ wt).pow(2).sum())
    cos = math.sqrt(along_d / frob) if frob > 0 else 0.0
    gain = math.sqrt(along_t / along_b) - 1.0 if along_b > 0 else None
    return cos, gain


def forensics(
    base: ModelRef,
    tuned: ModelRef,
    *,
    base_loaded: Any = None,
    harmful_prompts: Sequence[Any] = (),
    harmless_prompts: Sequence[Any] = (),
    directions: Any = None,
    refusal_layer: int | None = None,
) -> tuple[ForensicsReport, Any, int | None]:
    """Compare the effective weights of two refs; compute the base refusal direction when prompts are given.

    Args:
        base: The base model.
        tuned: The fine-tuned model.
        base_loaded: The loaded base model (for the refusal direction).
        harmful_prompts: Harmful prompts for the direction.
        harmless_prompts: Harmless prompts for the direction.
        directions: Precomputed directions (e.g. from a cache); then no model is needed.
        refusal_layer: The precomputed direction's selected layer.

    Returns:
        The report, the directions tensor (or None) and the selected layer.
    """
    if directions is None and base_loaded is not None and harmful_prompts and harmless_prompts:
        from tunesec.models.directions import refusal_directions

        rd = refusal_directions(base_loaded, harmful_prompts, harmless_prompts)
        directions, refusal_layer = rd.directions, rd.layer
    wb, base_info = effective_weights(base)
    wt, tuned_info = effective_weights(tuned)
    report = analyse(
        wb,
        wt,
        directions=directions,
        refusal_layer=refusal_layer,
        base_adapter=base_info,
        tuned_adapter=tuned_info,
    )
    return report, directions, refusal_layer


def drift_plot(report: ForensicsReport) -> bytes:
    """Two panels by layer: relative weight drift (all / attention / MLP) and refusal-direction alignment."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [x.layer for x in report.layers]
    has_dir = any(x.refusal_cos is not None for x in report.layers)
    fig = Figure(figsize=(9.0, 6.2 if has_dir else 3.4), dpi=100)
    ax = fig.add_subplot(2 if has_dir else 1, 1, 1)
    ax.plot(xs, [x.drift for x in report.layers], marker="o", color="#1d2430", label="all weights")
    ax.plot(xs, [x.attn_drift for x in report.layers], marker=".", color="#4e79a7", label="attention")
    ax.plot(xs, [x.mlp_drift for x in report.layers], marker=".", color="#f28e2b", label="MLP")
    ax.set_ylabel("||W_tuned - W_base|| / ||W_base||")
    ax.set_title("Relative weight drift by layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_dir:
        ax2 = fig.add_subplot(2, 1, 2)
        cos = [x.refusal_cos if x.refusal_cos is not None else float("nan") for x in report.layers]
        gain = [x.refusal_gain if x.refusal_gain is not None else float("nan") for x in report.layers]
        ax2.bar(xs, cos, color="#e15759", alpha=0.8, label="cos(update, refusal dir)")
        ax2.axhline(report.random_cos, color="#5b6575", linestyle="--", linewidth=1, label="random update")
        ax2.set_ylabel("alignment of o_proj/down_proj update")
        ax2.set_xlabel("layer")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.grid(alpha=0.3)
        twin = ax2.twinx()
        twin.plot(xs, gain, color="#59a14f", marker="s", label="gain along refusal dir")
        twin.axhline(0.0, color="#59a14f", linewidth=0.6)
        twin.set_ylabel("relative gain (< 0: removed)")
        handles = ax2.get_legend_handles_labels()
        h2 = twin.get_legend_handles_labels()
        ax2.legend(handles[0] + h2[0], handles[1] + h2[1], fontsize=8, loc="upper left")
        ax2.set_title("Does the update write along the base model's refusal direction?")
    else:
        ax.set_xlabel("layer")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
