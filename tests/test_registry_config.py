"""The registry and typed configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from tunesec.config import Config, apply_overrides, load_config, read_yaml
from tunesec.errors import UsageError
from tunesec.registry import Registry, registry


def test_register_lookup_and_metadata() -> None:
    reg = Registry()

    class Probe:
        """Probe attack for tests.

        More text.
        """

    reg.add("attack", "probe-attack", Probe, threat_model="open-weights")
    entry = reg.get("attack", "probe-attack")
    assert entry.obj is Probe
    assert entry.description == "Probe attack for tests."
    assert entry.metadata == {"threat_model": "open-weights"}
    assert ("attack", "probe-attack") in reg


def test_names_are_validated_and_unique() -> None:
    reg = Registry()

    class A: ...

    class B: ...

    reg.add("judge", "same-name", A)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("judge", "same-name", B)
    with pytest.raises(ValueError, match="invalid"):
        reg.add("judge", "Bad_Name", A)
    with pytest.raises(ValueError, match="unknown registry kind"):
        reg.add("wizard", "x", A)


def test_unknown_lookup_lists_known_names() -> None:
    with pytest.raises(UsageError, match="unknown model 'nope'; expected one of: .*smollm2-135m"):
        registry.get("model", "nope")
    with pytest.raises(UsageError, match="unknown component kind"):
        registry.entries("wizard")


def test_entry_point_plugins_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.registry as regmod

    class FakeEP:
        def load(self):  # a plugin module exposes a function taking the registry
            return lambda reg: reg.add("guard", "plugin-guard", object, description="from a plugin")

    monkeypatch.setattr(regmod, "entry_points", lambda group: [FakeEP()] if group == regmod.PLUGIN_GROUP else [])
    reg = Registry()
    assert reg.get("guard", "plugin-guard").description == "from a plugin"


class Inner(Config):
    steps: int = Field(10, ge=1)


class Outer(Config):
    name: str = "x"
    inner: Inner = Inner()
    tags: list[str] = []


def test_yaml_config_with_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\ninner:\n  steps: 3\n")
    cfg = load_config(Outer, p, ["inner.steps=7", "tags=[a, b]"])
    assert (cfg.name, cfg.inner.steps, cfg.tags) == ("demo", 7, ["a", "b"])


class Component(Config):
    inner: Inner = Field(default_factory=lambda: Inner(steps=5))
    outer: Outer = Field(default_factory=lambda: Outer(name="component", inner=Inner(steps=2)))


def test_partial_nested_override_keeps_the_components_defaults(tmp_path: Path) -> None:
    """`--set inner.x=..` changes x only: the other keys keep the field's default, not the class defaults."""
    cfg = load_config(Component, None, ["outer.tags=[a]"])
    assert (cfg.inner.steps, cfg.outer.name, cfg.outer.inner.steps, cfg.outer.tags) == (5, "component", 2, ["a"])
    p = tmp_path / "c.yaml"
    p.write_text("outer:\n  inner: {}\n")
    cfg = load_config(Component, p, ["inner.steps=7"])
    assert (cfg.inner.steps, cfg.outer.name, cfg.outer.inner.steps) == (7, "component", 2)
    with pytest.raises(UsageError, match="unknown key 'inner.stepz'"):
        load_config(Component, None, ["inner.stepz=1"])


def test_attack_training_override_keeps_attack_defaults() -> None:
    from tunesec.attacks.backdoor import BackdoorConfig

    cfg = load_config(BackdoorConfig, None, ["training.learning_rate=1e-3"])
    default = BackdoorConfig()
    assert cfg.training.learning_rate == 1e-3
    assert cfg.training.model_dump(exclude={"learning_rate"}) == default.training.model_dump(exclude={"learning_rate"})


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  stepz: 3\n")
    with pytest.raises(UsageError, match=r"c.yaml: line 2: unknown key 'inner.stepz'; did you mean 'steps'\?"):
        load_config(Outer, p)


def test_bad_value_and_bad_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  steps: 0\n")
    with pytest.raises(UsageError, match="field 'inner.steps'"):
        load_config(Outer, p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(UsageError, match="malformed YAML"):
        read_yaml(p)
    p.write_text("- a list\n")
    with pytest.raises(UsageError, match="expected a YAML mapping"):
        read_yaml(p)
    with pytest.raises(UsageError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
