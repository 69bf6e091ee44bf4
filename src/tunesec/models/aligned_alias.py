"""The ``smollm2-135m-aligned`` alias: SmolLM2-135M-Instruct plus tunesec's shipped safety-alignment adapter.

SmolLM2-135M-Instruct refuses almost no harmful request, so attacks on it show nothing. The adapter in
``tunesec/assets/smollm2-135m-aligned`` (LoRA, safetensors) was trained with ``tunesec align`` from
``recipes/align-smollm2.yaml`` (the ``safety-sft`` alignment defense); its measured metrics are in
``metrics.json`` beside it.
"""

from __future__ import annotations

from pathlib import Path

from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.registry import register

ALIGNED_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-aligned"


@register(
    "model",
    "smollm2-135m-aligned",
    description="SmolLM2-135M-Instruct + tunesec's shipped safety-alignment LoRA adapter (refuses harmful requests).",
    params="135M",
    license="Apache-2.0",
    cache_dir="models/smollm2-135m",
)
def smollm2_135m_aligned() -> ModelRef:
    """The embedded default model with the shipped alignment adapter on top."""
    from tunesec.models.aliases import smollm2_135m

    if not (ALIGNED_ADAPTER_DIR / "adapter_config.json").is_file():
        raise UsageError(f"{ALIGNED_ADAPTER_DIR}: the shipped alignment adapter is missing (reinstall tunesec)")
    base = smollm2_135m()
    return base.model_copy(
        update={
            "adapter": str(ALIGNED_ADAPTER_DIR),
            "provenance": {
                **base.provenance,
                "alias": "smollm2-135m-aligned",
                "base_spec": "smollm2-135m",
                "recipe": "recipes/align-smollm2.yaml",
            },
        }
    )
