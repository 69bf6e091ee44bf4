"""The shipped ``smollm2-135m-aligned`` adapter: safetensors, small, base recorded as the alias, metrics beside it."""

from __future__ import annotations

import json

import pytest

from tunesec.models.aligned_alias import ALIGNED_ADAPTER_DIR


def test_shipped_adapter_files() -> None:
    files = {p.name for p in ALIGNED_ADAPTER_DIR.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    cfg = json.loads((ALIGNED_ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2-135m"
    assert cfg["r"] <= 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (ALIGNED_ADAPTER_DIR / "adapter_model.safetensors").stat().st_size < 8 * 2**20


def test_shipped_recipe_is_a_valid_config() -> None:
    from tunesec.config import read_yaml, validate
    from tunesec.defenses.alignment import SafetySFTConfig

    cfg = validate(SafetySFTConfig, read_yaml(ALIGNED_ADAPTER_DIR / "recipe.yaml"), "recipe.yaml")
    assert cfg.training.method == "lora" and cfg.training.lora_r == 8


def test_metrics_hold_measured_values_with_intervals() -> None:
    metrics = json.loads((ALIGNED_ADAPTER_DIR / "metrics.json").read_text())
    for key in ("advbench", "jbb-harmful", "xstest-safe", "jbb-benign"):
        m = metrics["eval"][key]["refusal_rate"]
        assert 0.0 <= m["ci_low"] <= m["value"] <= m["ci_high"] <= 1.0 and m["n"] > 0
    assert metrics["eval"]["sst2"]["accuracy"]["n"] > 0


def test_alias_points_at_the_shipped_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.models.aliases as aliases
    from tunesec.attacks.base import root_base_spec
    from tunesec.models.aligned_alias import smollm2_135m_aligned
    from tunesec.models.ref import ModelRef

    base = ModelRef(base="/cache/smollm2-135m", kind="hf", provenance={"alias": "smollm2-135m"})
    monkeypatch.setattr(aliases, "smollm2_135m", lambda: base)
    ref = smollm2_135m_aligned()
    assert ref.base == base.base and ref.adapter == str(ALIGNED_ADAPTER_DIR)
    assert ref.provenance["base_spec"] == "smollm2-135m"
    # An attack on the alias records the plain base alias in its adapter config.
    from tunesec.registry import registry

    if ("model", "smollm2-135m-aligned") in registry:
        assert root_base_spec(ModelRef(base="smollm2-135m-aligned", kind="alias")) == "smollm2-135m"
