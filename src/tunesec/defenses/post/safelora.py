"""``safelora``: project the fine-tuning update of low-similarity layers onto the alignment subspace.

Hsu et al. 2024 (Safe LoRA, arXiv 2405.16833; IBM/SafeLoRA ``model.py``): per layer the alignment matrix is
``V = W_aligned - W_base``; the update ``dW = W_tuned - W_aligned`` is projected, ``P dW``; the layers whose
cosine ``cos(vec(P dW), vec(dW))`` is lowest (``num_proj_layers``=10, "number" mode) or at most ``threshold``
(0.5, "threshold" mode) get ``W = W_aligned + P dW``; the others keep their update. No data.

The projector: the official code uses ``C = V V^T / ||V||_F``, which is not a projection (``C C != C``; its
eigenvalues are ``s_i^2 / ||V||_F``, so it shrinks an update by the scale of V). tunesec's default,
``projection: exact``, is the orthogonal projector onto V's column space, ``U U^T`` (U: V's left singular
vectors with singular value above ``rtol`` times the largest), which is idempotent and leaves an update inside
the subspace unchanged; ``projection: official`` is the paper's C. The update is taken dense (the tuned model
merged), so it also covers a full fine-tune, and an adapter that continued the aligned adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from tunesec.config import Config
from tunesec.defenses.post.base import STAGE, THREAT_MODEL, PostRepair, RepairInputs
from tunesec.registry import register

if TYPE_CHECKING:
    import torch


class SafeLoRAConfig(Config):
    """Which layers SafeLoRA projects, and with which projector."""

    select: Literal["number", "threshold"] = Field(
        "number",
        description="number: the num_proj_layers lowest-cosine layers; threshold: every layer with cos <= threshold.",
    )
    num_proj_layers: int = Field(
        10, ge=0, description="Layers (weight matrices) projected in 'number' mode (paper: 10)."
    )
    threshold: float = Field(
        0.5, ge=-1.0, le=1.0, description="Cosine at or below which a layer is projected in 'threshold' mode."
    )
    projection: Literal["exact", "official"] = Field(
        "exact",
        description="exact: orthogonal projector onto V's column space; official: V V^T / ||V||_F (IBM/SafeLoRA).",
    )
    rtol: float = Field(
        1e-4, gt=0.0, lt=1.0, description="exact: singular values below rtol * the largest are dropped (V's rank)."
    )


def projector_basis(v: torch.Tensor, rtol: float) -> torch.Tensor:
    """Orthonormal basis (columns) of ``v``'s column space: left singular vectors with s > rtol * s_max.

    Computed from the eigendecomposition of the smaller Gram matrix (``V V^T`` or ``V^T V``, float64), which is
    what an SVD would do at a fraction of the cost for the wide and tall weights of an MLP.
    """
    import torch

    vd = v.double()
    out_f, in_f = vd.shape
    gram = vd @ vd.T if out_f <= in_f else vd.T @ vd
    evals, evecs = torch.linalg.eigh(gram)  # ascending; eigenvalues are the squared singular values
    evals, evecs = evals.flip(0), evecs.flip(1)
    top = float(evals[0]) if evals.numel() else 0.0
    if top <= 0.0:
        return vd[:, :0]
    keep = int((evals > (rtol**2) * top).sum())
    if out_f <= in_f:
        return evecs[:, :keep]
    sing = evals[:keep].sqrt()
    return (vd @ evecs[:, :keep]) / sing[None, :]


def project(update: torch.Tensor, v: torch.Tensor, *, mode: str = "exact", rtol: float = 1e-4) -> torch.Tensor:
    """The update projected onto the alignment matrix ``v``'s subspace (``mode``: exact or official)."""
    if mode == "official":
        vd = v.double()
        norm = vd.norm()
        if float(norm) == 0.0:
            return update.new_zeros(update.shape)
        return ((vd @ (vd.T @ update.double())) / norm).to(update.dtype)
    basis = projector_basis(v, rtol)
    return (basis @ (basis.T @ update.double())).to(update.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the flattened tensors (0 when either is zero)."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float((a.double() * b.double()).sum()) / (na * nb)


def layer_cosines(inputs: RepairInputs, mode: str, rtol: float) -> list[tuple[str, float, Any]]:
    """(name, cos, projected update) of every updated layer; layers where V = 0 are left out (noted)."""
    import torch

    assert inputs.base is not None
    base = inputs.base.params
    out: list[tuple[str, float, Any]] = []
    flat = 0
    with torch.no_grad():
        for name, w_tuned, w_aligned in inputs.updated_layers():
            v = w_aligned - base[name]
            if not bool(v.any()):
                flat += 1
                continue
            update = w_tuned - w_aligned
            projected = project(update, v, mode=mode, rtol=rtol)
            out.append((name, cosine(projected, update), projected))
    if flat:
        inputs.notes.append(f"{flat} updated layers have no alignment direction (W_aligned = W_base): left as tuned")
    return out


def select_layers(cosines: list[float], config: SafeLoRAConfig) -> list[bool]:
    """Which layers to project: the k lowest cosines (ties at the k-th included, as the official code) or <= tau."""
    if config.select == "threshold":
        return [c <= config.threshold for c in cosines]
    if config.num_proj_layers == 0 or not cosines:
        return [False] * len(cosines)
    k = min(config.num_proj_layers, len(cosines))
    cut = sorted(cosines)[k - 1]
    return [c <= cut for c in cosines]


@register(
    "defense",
    "safelora",
    description="Project the update of low-similarity layers onto the alignment subspace W_aligned - W_base.",
    stage=STAGE,
    paper="Hsu et al. 2024, Safe LoRA, arXiv 2405.16833",
    threat_model=THREAT_MODEL,
    needs_harmful=False,
    needs_base=True,
)
class SafeLoRA(PostRepair):
    """Project the fine-tuning update of low-similarity layers onto the alignment subspace W_aligned - W_base."""

    name: ClassVar[str] = "safelora"
    config_class: ClassVar[type[Config]] = SafeLoRAConfig

    def needs_base(self) -> bool:
        """SafeLoRA's alignment matrix is W_aligned - W_base."""
        return True

    def apply(self, inputs: RepairInputs, *, progress: bool = True) -> dict[str, Any]:
        """Replace the update of the selected layers by its projection; report every layer's cosine."""
        import torch

        cfg = self.config
        assert isinstance(cfg, SafeLoRAConfig)
        rows = layer_cosines(inputs, cfg.projection, cfg.rtol)
        chosen = select_layers([c for _, c, _ in rows], cfg)
        params = inputs.tuned.params
        aligned = inputs.aligned.params
        with torch.no_grad():
            for (name, _, projected), pick in zip(rows, chosen, strict=True):
                if pick:
                    params[name].copy_(aligned[name] + projected)
        n = sum(chosen)
        inputs.notes.append(f"safelora: projected {n} of {len(rows)} updated layers ({cfg.select} mode)")
        return {
            "projected": [name for (name, _, _), pick in zip(rows, chosen, strict=True) if pick],
            "cosines": {name: round(c, 6) for name, c, _ in rows},
            "n_layers": len(rows),
        }
