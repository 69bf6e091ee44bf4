"""``data-filter``: drop the user's rows that the data audit flags before the provider trains on them.

The provider's first control (moderation of uploaded fine-tuning data, as OpenAI's fine-tuning API does): the
rows are written to a JSONL file in the run directory and passed through :func:`tunesec.audit.runner.audit`'s
detectors (default: ``harmful``, the judge-based detector that ``tunesec audit`` runs: answers judged harmful
compliance); a row is dropped when any chosen detector flags it. ``threshold`` sets the harmful detector's score
cut (``Score.score >= threshold``; null: the judge's own decision). The dropped rows' ids and the detectors that
flagged them go into the provenance (the ``filter`` stage of the service's ``run.json``); their text does not.

Defaults: no paper default exists (providers do not publish theirs); 0.5 is the judge's calibrated decision point.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.finetune.base import FineTuneDefense, ServiceContext
from tunesec.errors import UsageError
from tunesec.registry import register

AUDITED_FILE = "user_data.audit.jsonl"


class DataFilterConfig(Config):
    """Which audit detectors drop rows, and the harmful detector's threshold."""

    detectors: list[str] = Field(
        default_factory=lambda: ["harmful"],
        description="Audit detectors whose flagged rows are dropped (tunesec list detectors).",
    )
    threshold: float | None = Field(
        0.5, ge=0.0, le=1.0, description="Harmful-score cut of the harmful detector; null: the judge's decision."
    )
    judge: str = Field("default", description="Judge of the harmful detector (tunesec list judges).")
    policy: str | None = Field(None, description="Audit policy YAML for the other detectors' settings (optional).")
    max_drop: float = Field(
        1.0, ge=0.0, le=1.0, description="Refuse the upload (usage error) when more than this share is dropped."
    )


def is_poison(example: Example) -> bool:
    """Whether the data marks a row as harmful: tunesec's poison mix (``poison``) or git-disl's files (``flag``)."""
    return example.meta.get("poison") is True or example.meta.get("flag") == "unsafe"


def flagged_rows(examples: Sequence[Example], config: DataFilterConfig, ctx: ServiceContext) -> dict[int, list[str]]:
    """Row index -> names of the chosen detectors that flagged it (audit of the rows as written to the run dir)."""
    from tunesec.audit.policy import load_audit_policy
    from tunesec.audit.runner import audit, build_detectors

    _, configs = load_audit_policy(config.policy)
    unknown = [d for d in config.detectors if d not in configs]
    if unknown:
        raise UsageError(f"data-filter: detectors: unknown detector {unknown[0]!r}; expected one of {sorted(configs)}")
    chosen = {}
    for name in config.detectors:
        cfg = configs[name]
        update: dict[str, Any] = {"enabled": True}
        if name == "harmful":
            update["threshold"] = config.threshold
            update["judge"] = config.judge
        chosen[name] = cfg.model_copy(update=update)
    path = ctx.run_dir / AUDITED_FILE
    from tunesec.store.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"messages": e.chat()}) + "\n" for e in examples))
    result = audit(path, write=False, detectors=build_detectors(chosen, None), strict=True)
    if result.rows != len(examples):
        raise UsageError(f"data-filter: the audit read {result.rows} of {len(examples)} rows")
    flagged: dict[int, list[str]] = {}
    for f in result.findings:
        if f.detector in chosen:
            for i in f.rows:
                flagged.setdefault(i, []).append(f.detector)
    return flagged


@register(
    "defense",
    "data-filter",
    description="Drop user rows the data audit flags (harmful compliance by the judge; threshold in the recipe).",
    stage="fine-tuning",
    paper="Provider moderation of fine-tuning data (OpenAI fine-tuning API; Qi et al. 2023 Sec. 5)",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class DataFilter(FineTuneDefense):
    """The audit's detectors as a filter on the user's data (see the module docstring)."""

    name = "data-filter"
    config_class = DataFilterConfig

    def filter_data(self, examples: Sequence[Example], ctx: ServiceContext) -> tuple[list[Example], dict[str, Any]]:
        """The rows no chosen detector flags; provenance: counts and the dropped rows' ids."""
        assert isinstance(self.config, DataFilterConfig)
        rows = list(examples)
        flagged = flagged_rows(rows, self.config, ctx)
        share = len(flagged) / max(len(rows), 1)
        if share > self.config.max_drop:
            raise UsageError(
                f"data-filter: {len(flagged)} of {len(rows)} rows flagged ({share:.0%}), above max_drop "
                f"{self.config.max_drop:.0%}; the upload is refused"
            )
        kept = [e for i, e in enumerate(rows) if i not in flagged]
        if not kept:
            raise UsageError(f"data-filter: every one of the {len(rows)} user rows was flagged; nothing to train on")
        by_detector: dict[str, int] = {}
        for names in flagged.values():
            for n in set(names):
                by_detector[n] = by_detector.get(n, 0) + 1
        dropped_poison = sum(1 for i in flagged if is_poison(rows[i]))
        n_poison = sum(1 for e in rows if is_poison(e))
        prov = {
            "rows": len(rows),
            "kept": len(kept),
            "dropped": len(flagged),
            "dropped_by_detector": by_detector,
            "dropped_ids": sorted(rows[i].id for i in flagged),
            # when the data says which rows are poison (an attack's mix), how well the filter did
            **({"poison_rows": n_poison, "poison_dropped": dropped_poison} if n_poison else {}),
        }
        ctx.notes.append(
            f"data-filter: dropped {len(flagged)} of {len(rows)} rows"
            + (f" ({dropped_poison} of the {n_poison} poison rows)" if n_poison else "")
        )
        return kept, prov
