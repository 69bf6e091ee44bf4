"""``resta``: add a safety vector back to the fine-tuned model.

Bhardwaj et al. 2024 (RESTA, "Language Models are Homer Simpson!", arXiv 2402.11746): the safety vector is
``tau = theta_aligned - theta_unaligned``, where the unaligned model is the aligned one fine-tuned on harmful
question-answer pairs; the repaired model is ``theta_tuned + scale * tau`` (over every parameter). Optionally the
fine-tuning update ``theta_tuned - theta_aligned`` is first sparsified with DARE (drop a fraction ``dare_drop``
of its entries at random, rescale the rest by ``1 / (1 - dare_drop)``), as the paper does. Its ``scale`` and
DARE rate are not verified against code (none is published); defaults: 1.0 and 0 (no DARE).

The unaligned model is made by tunesec's own ``harmful-sft`` attack on the aligned model (config ``unalign``:
the attack's fields) once per (aligned weights, attack config) and cached under
``$TUNESEC_HOME/resta-unaligned/<key>/`` (default ``~/.cache/tunesec``); ``unaligned`` names a model to use
instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from tunesec.attacks.harmful_sft import HarmfulSFTConfig
from tunesec.config import Config
from tunesec.defenses.post.base import (
    STAGE,
    THREAT_MODEL,
    PostRepair,
    RepairInputs,
    check_same_shapes,
    load_dense,
    resolve_model,
)
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.registry import register


class RESTAConfig(Config):
    """The safety vector's scale, DARE, and how the unaligned model is made (or which one to use)."""

    scale: float = Field(1.0, description="Multiplier of the safety vector theta_aligned - theta_unaligned.")
    dare_drop: float = Field(0.0, ge=0.0, lt=1.0, description="DARE drop rate on the fine-tuning update (0: off).")
    seed: int = Field(0, description="Seed of DARE's random drop.")
    unaligned: str | None = Field(
        None,
        description="The unaligned model (spec or run directory); default: harmful-sft on the aligned model, cached.",
    )
    unalign: HarmfulSFTConfig = Field(
        default_factory=HarmfulSFTConfig,
        description="harmful-sft attack config that makes the unaligned model (a partial mapping overrides its keys).",
    )


def unaligned_cache_dir(aligned: ModelRef, attack: HarmfulSFTConfig) -> Path:
    """Where the unaligned counterpart of ``aligned`` made with ``attack`` is cached."""
    from tunesec.models.fingerprint import fingerprint
    from tunesec.paths import tunesec_home

    fp = fingerprint(aligned)
    weights = {k: fp.get(k) for k in ("weights_sha256", "adapter_sha256")}
    if not any(weights.values()):
        weights = {"ref": fp.get("resolved", fp.get("ref"))}
    blob = json.dumps({"aligned": weights, "attack": attack.model_dump(mode="json")}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return tunesec_home() / "resta-unaligned" / key


def unaligned_model(
    aligned: ModelRef, attack: HarmfulSFTConfig, *, notes: list[str] | None = None, progress: bool = True
) -> ModelRef:
    """The aligned model after ``harmful-sft`` with ``attack``: from the cache, or trained once and cached.

    Training goes to ``<key>.partial`` (resumed from its last checkpoint after a kill) and is renamed to the
    cache entry when done, so a half-trained model is never read as the cached one.
    """
    from tunesec.attacks import get_attack

    target = unaligned_cache_dir(aligned, attack)
    if (target / "model_ref.json").is_file():
        if notes is not None:
            notes.append(f"resta: unaligned model from the cache ({target})")
        return _cached_ref(target)
    partial = target.with_name(target.name + ".partial")
    resume = partial.is_dir() and any(
        (c / "trainer_state.json").is_file() for c in partial.glob("checkpoints/checkpoint-*")
    )
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    get_attack("harmful-sft", attack).run(aligned, partial, resume=resume, progress=progress)
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    partial.rename(target)
    if notes is not None:
        notes.append(f"resta: made the unaligned model with harmful-sft and cached it ({target})")
    return _cached_ref(target)


def _cached_ref(target: Path) -> ModelRef:
    """The cached unaligned model's ref, its paths re-pointed at the cache entry (it was trained in .partial)."""
    ref = ModelRef.model_validate(json.loads((target / "model_ref.json").read_text(encoding="utf-8")))
    if ref.adapter is not None:
        return ref.model_copy(update={"adapter": str((target / "model").resolve())})
    return ref.model_copy(update={"base": str((target / "model").resolve())})


@register(
    "defense",
    "resta",
    description="Add back a safety vector theta_aligned - theta_unaligned (unaligned: harmful-sft on aligned, cached).",
    stage=STAGE,
    paper="Bhardwaj et al. 2024, RESTA, arXiv 2402.11746",
    threat_model=THREAT_MODEL,
    needs_harmful=True,
    needs_base=False,
)
class RESTA(PostRepair):
    """Add back a safety vector theta_aligned - theta_unaligned to the fine-tuned model."""

    name: ClassVar[str] = "resta"
    config_class: ClassVar[type[Config]] = RESTAConfig

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build RESTA with a config (instance, mapping of fields, or the defaults)."""
        super().__init__(config)
        self._unaligned: ModelRef | None = None

    def preflight(self, tuned: ModelRef, aligned: ModelRef, notes: list[str]) -> None:
        """Resolve (or make and cache) the unaligned model before the repair loads anything."""
        cfg = self.config
        assert isinstance(cfg, RESTAConfig)
        if cfg.unaligned is not None:
            self._unaligned = resolve_model(cfg.unaligned, role="unaligned")
        else:
            self._unaligned = unaligned_model(aligned, cfg.unalign, notes=notes)

    def apply(self, inputs: RepairInputs, *, progress: bool = True) -> dict[str, Any]:
        """Set theta = theta_tuned (DARE-sparsified update) + scale * (theta_aligned - theta_unaligned)."""
        import torch

        cfg = self.config
        assert isinstance(cfg, RESTAConfig)
        if self._unaligned is None:
            raise UsageError("resta: preflight did not run (call tunesec.repair, which runs it)")
        unaligned = load_dense(self._unaligned, role="unaligned")
        check_same_shapes(inputs.aligned, unaligned)
        tuned, aligned, bad = inputs.tuned.params, inputs.aligned.params, unaligned.params
        gen = torch.Generator().manual_seed(cfg.seed)
        norm_sq = 0.0
        with torch.no_grad():
            for name, w in tuned.items():
                if not w.is_floating_point():
                    continue
                if cfg.dare_drop > 0.0:
                    update = w - aligned[name]
                    keep = torch.rand(update.shape, generator=gen) >= cfg.dare_drop
                    w.copy_(aligned[name] + update * keep / (1.0 - cfg.dare_drop))
                tau = aligned[name] - bad[name]
                norm_sq += float(tau.double().pow(2).sum())
                w.add_(tau, alpha=cfg.scale)
        inputs.notes.append(f"resta: added {cfg.scale} x the safety vector (norm {norm_sq**0.5:.4g})")
        return {
            "unaligned": self._unaligned.spec(),
            "safety_vector_norm": norm_sq**0.5,
            "scale": cfg.scale,
            "dare_drop": cfg.dare_drop,
        }
