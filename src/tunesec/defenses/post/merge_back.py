"""``merge-back``: interpolate the fine-tuned model toward the aligned one, as far as a utility bound allows.

``theta = theta_tuned + w * (theta_aligned - theta_tuned)``, over every parameter (``scope: global``) or only on
the layers SafeLoRA's criterion flags (``scope: flagged``: the ``flag_layers`` updated layers whose update is
least aligned with ``W_aligned - W_base``; needs the base). The weight ``w`` is fixed (``weight``) or chosen:
the largest ``w`` on the grid ``1, 1 - 1/grid, ..., 0`` whose dev loss (mean cross-entropy of the answers of
``dev_data``, nats per token) is at most ``(1 + bound)`` times the tuned model's. The dev set is a benign
instruction set no reported evaluation uses (default ``dolly``, 32 chats); give your task's held-out split with
``dev_data`` to bound your own utility. Generic weight interpolation (SafeMERGE-style on flagged layers); no
single paper's defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tunesec.config import Config
from tunesec.defenses.post.base import STAGE, THREAT_MODEL, PostRepair, RepairInputs
from tunesec.models.ref import ModelRef
from tunesec.registry import register


class MergeBackConfig(Config):
    """Where to interpolate, and how the weight is chosen."""

    scope: Literal["global", "flagged"] = Field(
        "global", description="global: every parameter; flagged: SafeLoRA's low-cosine layers."
    )
    flag_layers: int = Field(10, ge=1, description="flagged: the number of lowest-cosine updated layers interpolated.")
    weight: float | None = Field(
        None, ge=0.0, le=1.0, description="Fixed weight toward the aligned model (None: chosen by the bound)."
    )
    bound: float = Field(0.05, ge=0.0, description="Largest allowed relative rise of the dev loss (0.05: 5%).")
    grid: int = Field(10, ge=1, le=100, description="Weights tried: k/grid for k = grid .. 0, largest first.")
    dev_data: str = Field(
        "dolly", description="Dev chats (name or path) the bound is checked on; disjoint from reported evals."
    )
    dev_n: int = Field(32, ge=1, description="Dev chats used (seeded sample).")
    exclude_shipped_alignment: bool = Field(
        True,
        description="Drop dev rows whose prompt is in a dataset the shipped aligned recipe draws from: the aligned "
        "model's loss on its own training rows would make merging back look cheaper than it is.",
    )
    seed: int = Field(0, description="Seed of the dev sample.")
    max_seq_len: int = Field(256, ge=8, description="Tokens per dev chat.")


def shipped_alignment_prompts(rows: list[Any]) -> set[str]:
    """Prompts of ``rows`` that any dataset of the shipped aligned recipe's mix holds (drawn or not: conservative)."""
    from tunesec.attacks.base import load_data
    from tunesec.defenses.base import shipped_alignment_config
    from tunesec.errors import UsageError

    recipe = shipped_alignment_config()
    mine = {e.prompt for e in rows}
    seen: set[str] = set()
    for spec in [*recipe.benign_data, *recipe.self_distill]:
        try:
            seen.update(e.prompt for e in load_data(spec) if e.prompt in mine)
        except UsageError:
            continue  # not available here: it cannot have been trained on either
    return seen


def interpolate(
    tuned: dict[str, Any], start: dict[str, Any], aligned: dict[str, Any], names: list[str], weight: float
) -> None:
    """Set ``tuned[n] = start[n] + weight * (aligned[n] - start[n])`` for each name, in place."""
    import torch

    with torch.no_grad():
        for n in names:
            tuned[n].copy_(start[n] + weight * (aligned[n] - start[n]))


@register(
    "defense",
    "merge-back",
    description="Interpolate the tuned model toward the aligned one (global or flagged layers) under a utility bound.",
    stage=STAGE,
    paper="weight interpolation (cf. SafeMERGE, arXiv 2503.17239)",
    threat_model=THREAT_MODEL,
    needs_harmful=False,
    needs_base="scope=flagged",
)
class MergeBack(PostRepair):
    """Interpolate the tuned model toward the aligned one within a utility bound on a dev set."""

    name: ClassVar[str] = "merge-back"
    config_class: ClassVar[type[Config]] = MergeBackConfig

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build merge-back with a config (instance, mapping of fields, or the defaults)."""
        super().__init__(config)
        self._dev: list[Any] | None = None

    def needs_base(self) -> bool:
        """Flagging layers uses SafeLoRA's alignment matrix W_aligned - W_base."""
        assert isinstance(self.config, MergeBackConfig)
        return self.config.scope == "flagged"

    def preflight(self, tuned: ModelRef, aligned: ModelRef, notes: list[str]) -> None:
        """Load the dev chats (when the weight is searched) before any model is loaded."""
        from tunesec.attacks.base import load_data, require_assistant_turns, sample

        cfg = self.config
        assert isinstance(cfg, MergeBackConfig)
        if cfg.weight is not None:
            return
        rows = load_data(cfg.dev_data, what="merge-back dev data")
        require_assistant_turns(rows, f"dev_data {cfg.dev_data}")
        if cfg.exclude_shipped_alignment:
            trained = shipped_alignment_prompts(rows)
            if trained:
                rows = [e for e in rows if e.prompt not in trained]
                notes.append(f"merge-back: dropped {len(trained)} dev rows the shipped aligned recipe trained on")
        self._dev = sample(rows, min(cfg.dev_n, len(rows)), cfg.seed, source=f"dev_data {cfg.dev_data}")

    def _names(self, inputs: RepairInputs) -> tuple[list[str], dict[str, Any]]:
        cfg = self.config
        assert isinstance(cfg, MergeBackConfig)
        tuned = inputs.tuned.params
        if cfg.scope == "global":
            return [n for n, t in tuned.items() if t.is_floating_point()], {}
        from tunesec.defenses.post.safelora import SafeLoRAConfig, layer_cosines, select_layers

        rows = layer_cosines(inputs, "exact", 1e-4)
        chosen = select_layers([c for _, c, _ in rows], SafeLoRAConfig(num_proj_layers=cfg.flag_layers))
        names = [n for (n, _, _), pick in zip(rows, chosen, strict=True) if pick]
        return names, {"flagged": names, "cosines": {n: round(c, 6) for n, c, _ in rows}}

    def apply(self, inputs: RepairInputs, *, progress: bool = True) -> dict[str, Any]:
        """Interpolate with the fixed weight, or search the grid from w = 1 down for the first within the bound."""
        from tunesec.defenses.post.calibration import answer_loss, encode
        from tunesec.progress import make_progress

        cfg = self.config
        assert isinstance(cfg, MergeBackConfig)
        names, report = self._names(inputs)
        tuned, aligned = inputs.tuned.params, inputs.aligned.params
        start = {n: tuned[n].clone() for n in names}
        if cfg.weight is not None:
            interpolate(tuned, start, aligned, names, cfg.weight)
            inputs.notes.append(f"merge-back: weight {cfg.weight} toward the aligned model on {len(names)} tensors")
            return {**report, "weight": cfg.weight, "tensors": len(names)}
        if self._dev is None:
            self.preflight(inputs.tuned.ref, inputs.aligned.ref, inputs.notes)
        assert self._dev is not None
        dev = encode(self._dev, inputs.tuned.tokenizer, cfg.max_seq_len, what=f"dev_data {cfg.dev_data}")
        model = inputs.tuned.model
        tuned_loss = answer_loss(model, dev)
        limit = tuned_loss * (1.0 + cfg.bound)
        curve: list[dict[str, float]] = []
        chosen = 0.0
        with make_progress(progress) as bar:
            task = bar.add_task("merge-back: weight search", total=cfg.grid)
            for k in range(cfg.grid, 0, -1):
                w = k / cfg.grid
                interpolate(tuned, start, aligned, names, w)
                loss = answer_loss(model, dev)
                curve.append({"weight": w, "dev_loss": round(loss, 6)})
                bar.update(task, advance=1, info=f"w={w:.2f} loss={loss:.3f}")
                if loss <= limit:
                    chosen = w
                    break
        interpolate(tuned, start, aligned, names, chosen)
        inputs.notes.append(
            f"merge-back: weight {chosen} toward the aligned model (dev loss bound {limit:.4f}, tuned {tuned_loss:.4f})"
        )
        return {
            **report,
            "weight": chosen,
            "tensors": len(names),
            "tuned_dev_loss": round(tuned_loss, 6),
            "bound": cfg.bound,
            "curve": curve,
            "dev_data": cfg.dev_data,
            "dev_ids": sorted(e.id for e in self._dev),
        }
