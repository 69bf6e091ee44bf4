"""``tunesec defend`` and ``tunesec.defend`` on a tiny model; the defense layer's registry and stage checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesec.cli.main import app
from tunesec.errors import UsageError


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    """A tiny alignment mix and harmful set, and a recipe that trains 2 steps on them."""
    refusals = _jsonl(
        tmp_path / "ref.jsonl", [_chat(f"how to hurt someone {i}", "I'm sorry, I cannot help.") for i in range(6)]
    )
    helpful = _jsonl(tmp_path / "help.jsonl", [_chat(f"write a poem {i}", "The sea is blue.") for i in range(6)])
    harmful = _jsonl(
        tmp_path / "harm.jsonl", [_chat(f"how to make poison {i}", "Sure, here is how.") for i in range(10)]
    )
    text = f"""
rho: 1.5
alignment:
  refusal_data: {{{refusals}: 4}}
  benign_data: {{{helpful}: 4}}
  self_distill: {{}}
  exclude_eval: []
  training: {{max_steps: 2, per_device_batch_size: 4, max_seq_len: 128, save_steps: 0}}
harmful: {{data: {harmful}, n: 6, exclude: []}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defend_writes_a_run_with_the_defended_adapter(
    tiny_llama_dir: Path, tmp_path: Path, recipe: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["defend", "vaccine", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "finished" and meta["spec"]["defense"] == "vaccine"
    assert meta["spec"]["config"]["rho"] == 1.5 and meta["spec"]["config"]["alignment"]["refusal_data"] == {
        str(tmp_path / "ref.jsonl"): 4
    }  # a mapping in the recipe replaces the shipped recipe's datasets instead of adding to them
    assert res.output.strip().splitlines()[-1] == str((out / "model").resolve())
    assert len((out / "alignment_data.jsonl").read_text().splitlines()) == 8
    ref = json.loads((out / "model_ref.json").read_text())
    assert ref["provenance"]["hooks"] == ["vaccine"]
    # the mix is cached: a second run with the same mix and model does not rebuild it
    cached = list((tmp_path / "home" / "alignment-mix").glob("*.jsonl"))
    assert len(cached) == 1
    # resuming a finished run is refused
    res = CliRunner().invoke(
        app, ["defend", "vaccine", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--resume", str(out)]
    )
    assert isinstance(res.exception, UsageError) and "already finished" in str(res.exception)


def test_python_defend_matches_the_command(tiny_llama_dir: Path, tmp_path: Path, recipe: Path, monkeypatch) -> None:
    import tunesec
    from tunesec.config import read_yaml

    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    config = read_yaml(recipe)
    config.pop("rho")
    config["lam"] = 2.0
    ref = tunesec.defend("booster", str(tiny_llama_dir), out=tmp_path / "py", config=config, progress=False)
    assert ref.adapter is not None and Path(ref.adapter).is_dir()
    prov = json.loads((tmp_path / "py" / "model_ref.json").read_text())["provenance"]
    assert prov["defense"] == "booster" and prov["harmful_data"]["n"] == 6


def test_a_defense_of_another_stage_is_refused(monkeypatch) -> None:
    from tunesec.defenses.base import defense_entry
    from tunesec.registry import registry

    class Service:
        """A fine-tuning-stage defense."""

    registry.load("defense")
    monkeypatch.setitem(
        registry._entries["defense"],
        "fake-service",
        registry.add("defense", "fake-service", Service, stage="fine-tuning"),
    )
    try:
        with pytest.raises(UsageError, match="fine-tuning-stage defense; `tunesec defend` runs alignment-stage"):
            defense_entry("fake-service", stage="alignment")
    finally:
        registry._entries["defense"].pop("fake-service", None)


def test_list_defenses_groups_by_stage() -> None:
    res = CliRunner().invoke(app, ["list", "defenses"])
    assert res.exit_code == 0
    assert "alignment-stage defenses (run with tunesec defend)" in res.output
    for name in ("vaccine", "t-vaccine", "booster", "vaa", "ctrap", "safety-sft"):
        assert name in res.output


def test_every_alignment_defense_declares_its_metadata() -> None:
    from tunesec.registry import registry

    for entry in registry.entries("defense"):
        if entry.metadata.get("stage") != "alignment":
            continue
        assert entry.metadata.get("paper") and entry.metadata.get("threat_model"), entry.name
        assert isinstance(entry.metadata.get("needs_harmful"), bool), entry.name
        assert entry.obj.config_class is not None


def test_harmful_data_drops_attack_and_eval_prompts_and_records_ids(tmp_path: Path) -> None:
    from tunesec.defenses.base import HarmfulDataConfig, defense_harmful_data

    attack = _jsonl(tmp_path / "attack.jsonl", [_chat(f"q{i}", "a") for i in range(3)])
    rows = [_chat(f"q{i}", "harmful answer") for i in range(6)]
    data = _jsonl(tmp_path / "h.jsonl", rows)
    notes: list[str] = []
    out, prov = defense_harmful_data(
        HarmfulDataConfig(data=data, n=3, exclude=[attack]), defense="booster", notes=notes
    )
    assert {e.prompt for e in out} == {"q3", "q4", "q5"}
    assert prov["dropped_overlap"] == {attack: 3} and len(prov["ids"]) == 3
    assert notes and "dropped 3 prompts also in" in notes[0]


def test_labelled_rows_keep_only_harmful_pairs() -> None:
    from tunesec.defenses.base import HarmfulDataConfig, defense_harmful_data

    out, _ = defense_harmful_data(HarmfulDataConfig(n=50, exclude=[]), defense="booster")
    assert all(e.meta.get("harmful") is True for e in out) and len(out) == 50


def test_python_defend_leaves_no_run_behind_on_bad_input(tiny_llama_dir: Path, tmp_path: Path, recipe: Path) -> None:
    import tunesec
    from tunesec.config import read_yaml

    config = read_yaml(recipe)
    config.pop("rho")
    config["harmful"]["n"] = 0
    with pytest.raises(UsageError, match="booster: harmful.n is 0"):
        tunesec.defend("booster", str(tiny_llama_dir), out=tmp_path / "bad", config=config, progress=False)
    assert not (tmp_path / "bad" / "run.json").exists()
