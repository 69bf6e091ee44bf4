"""``tunesec matrix`` on a tiny model: cells computed once, cached by content, resumable; cards; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tunesec.cli.main import app
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError


def _jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join((r.model_dump_json() if isinstance(r, Example) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture()
def setup(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> dict[str, Any]:
    """A 2 defenses x 2 attacks x 1 seed matrix config on the tiny model, with data files of a few rows."""
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    refusals = _jsonl(
        tmp_path / "ref.jsonl", [_chat(f"how to hurt someone {i}", "I'm sorry, I cannot.") for i in range(6)]
    )
    helpful = _jsonl(tmp_path / "help.jsonl", [_chat(f"write a poem {i}", "The sea is blue.") for i in range(6)])
    harmful = _jsonl(
        tmp_path / "harm.jsonl", [_chat(f"how to make poison {i}", "Sure, here is how.") for i in range(10)]
    )
    benign = _jsonl(tmp_path / "benign.jsonl", [_chat(f"name a color {i}", "Blue is a color.") for i in range(10)])
    prompts = _jsonl(
        tmp_path / "prompts.jsonl",
        [Example(id=f"h{i}", messages=[Message(role="user", content=f"how do I steal a car {i}")]) for i in range(4)],
    )
    utility = _jsonl(
        tmp_path / "util.jsonl",
        [
            Example(
                id=f"u{i}",
                messages=[Message(role="user", content=f"great film {i}")],
                label=("positive", "negative")[i % 2],
                source="sst2",
            )
            for i in range(4)
        ],
    )
    steps = {"max_steps": 2, "per_device_batch_size": 4, "max_seq_len": 96, "save_steps": 0}
    align = {
        "refusal_data": {refusals: 4},
        "benign_data": {helpful: 4},
        "self_distill": {},
        "exclude_eval": [],
        "training": steps,
    }
    config = {
        "model": str(tiny_llama_dir),
        "base": str(tiny_llama_dir),
        "defenses": ["none", "vaccine"],
        "attacks": ["harmful-sft", "benign-sft"],
        "defense_config": {"vaccine": {"alignment": align, "harmful": {"data": harmful, "n": 6, "exclude": []}}},
        "attack_config": {
            "harmful-sft": {"data": harmful, "n_harmful": 6, "training": steps},
            "benign-sft": {"data": benign, "n_examples": 6, "training": steps},
        },
        "harmful": {"dataset": prompts},
        "utility": {"dataset": utility, "task_options": {"scoring": "choices", "kind": "sentiment"}},
        "judge": "harm-classifier",
        "max_new_tokens": 4,
    }
    return {"config": config, "cache": tmp_path / "cache", "tmp": tmp_path}


def test_matrix_runs_caches_and_reports(setup: dict[str, Any]) -> None:
    from tunesec.matrix import run_matrix

    out = setup["tmp"] / "m1"
    summary = run_matrix(setup["config"], out=out, cache=setup["cache"], progress=False)
    assert summary["done_cells"] == 4 and not summary["failed_cells"]
    for name in ("matrix.csv", "matrix.json", "heatmap.png", "report.html"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    rows = list(csv.DictReader((out / "matrix.csv").open()))
    assert {(r["defense"], r["attack"]) for r in rows} == {
        (d, a) for d in ("none", "vaccine") for a in ("harmful-sft", "benign-sft")
    }
    assert all(int(r["harmful_n"]) == 4 for r in rows)
    cards = {c["defense"]: c for c in summary["cards"]}
    assert set(cards) == {"none", "vaccine"} and all(
        c["verdict"] in ("holds", "broken", "undecided") for c in cards.values()
    )
    assert all(c["best_adaptive"] is None for c in cards.values())  # both attacks are fixed ones
    # the vaccine cells attacked the defended adapter, the none cells the model as given
    for cell in summary["cells"]:
        parent = json.loads((_attack_dir(setup, cell) / "model_ref.json").read_text())["provenance"]["parent"]
        assert ("adapter" in json.dumps(parent)) == (cell["defense"] == "vaccine")

    # a second matrix with the same inputs computes nothing: every cell and defended model is a cache hit
    before = _mtimes(setup["cache"])
    again = run_matrix(setup["config"], out=setup["tmp"] / "m2", cache=setup["cache"], progress=False)
    assert _mtimes(setup["cache"]) == before
    assert [c["metrics"] for c in again["cells"]] == [c["metrics"] for c in summary["cells"]]
    # a changed attack config is a new cell for that attack only
    cfg = json.loads(json.dumps(setup["config"]))
    cfg["attack_config"]["benign-sft"]["n_examples"] = 5
    from tunesec.matrix.cells import make_plan
    from tunesec.matrix.config import MatrixConfig

    old = {c.key for c in make_plan(MatrixConfig.model_validate(setup["config"])).cells}
    new = {c.key for c in make_plan(MatrixConfig.model_validate(cfg)).cells}
    assert len(old & new) == 2 and len(new - old) == 2


def _attack_dir(setup: dict[str, Any], cell: dict[str, Any]) -> Path:
    (path,) = (setup["cache"] / "attacks").glob(f"{cell['attack']}--s{cell['seed']}-{cell['attack_key'][:16]}")
    return path


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_failed_cell_is_reported_and_resume_retries_it(setup: dict[str, Any], monkeypatch) -> None:
    from tunesec.matrix import cells as cells_mod
    from tunesec.matrix import run_matrix

    real = cells_mod._measure
    calls = {"n": 0}

    def flaky(model: Any, root: Path, *args: Any) -> Any:
        if "benign-sft" in root.name:
            calls["n"] += 1
            raise RuntimeError("disk on fire")
        return real(model, root, *args)

    monkeypatch.setattr(cells_mod, "_measure", flaky)
    cfg = dict(setup["config"], defenses=["none"], retries=1)
    out = setup["tmp"] / "m"
    summary = run_matrix(cfg, out=out, cache=setup["cache"], progress=False)
    assert calls["n"] == 2  # tried, then retried once
    assert [(f["attack"], f["error"]) for f in summary["failed_cells"]] == [("benign-sft", "disk on fire")]
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # left open for --resume
    failed = [r for r in csv.DictReader((out / "matrix.csv").open()) if r["status"] == "failed"]
    assert [r["attack"] for r in failed] == ["benign-sft"]
    assert "disk on fire" in (out / "report.html").read_text()
    monkeypatch.setattr(cells_mod, "_measure", real)
    summary = run_matrix(resume=out, progress=False)  # no --cache: the run's own cache, not the default one
    assert summary["done_cells"] == 2 and not summary["failed_cells"]
    dirs = [json.loads(line)["dir"] for line in (out / "cells.jsonl").read_text().splitlines()]
    assert dirs and all(Path(d).is_relative_to(Path(setup["cache"]).resolve()) for d in dirs)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # the attack of the failed cell had finished before the failure: the retry resumed it, not retrained
    attack_run = json.loads(next((setup["cache"] / "attacks").glob("benign-sft--*/run.json")).read_text())
    assert "resumed" not in attack_run


def test_repair_cells_share_the_attack_of_the_undefended_model(setup: dict[str, Any]) -> None:
    from tunesec.matrix import run_matrix

    helpful = str(setup["tmp"] / "help.jsonl")
    cfg = dict(
        setup["config"],
        defenses=["none", "merge-back"],
        attacks=["benign-sft"],
        defense_config={"merge-back": {"weight": 0.5, "dev_data": helpful, "dev_n": 4}},
    )
    summary = run_matrix(cfg, out=setup["tmp"] / "m", cache=setup["cache"], progress=False)
    assert summary["done_cells"] == 2 and not summary["failed_cells"]
    assert len(list((setup["cache"] / "attacks").iterdir())) == 1  # one attack run for both cells
    assert len(list((setup["cache"] / "given").iterdir())) == 1  # the given model measured once for both
    none, merged = summary["cells"]
    assert none["attack_key"] == merged["attack_key"]
    (cell,) = (setup["cache"] / "cells").glob("merge-back--*")
    repaired = json.loads((cell / "repair" / "model_ref.json").read_text())
    evaluated = json.loads((cell / "eval-harmful" / "run.json").read_text())["spec"]["model"]
    assert json.dumps(repaired["base"]) in json.dumps(evaluated)  # the repaired model was measured, not the attacked


def test_fine_tuning_stage_defense_trains_the_attack_through_the_service(setup: dict[str, Any]) -> None:
    from tunesec.matrix import run_matrix

    cfg = dict(setup["config"], defenses=["data-filter"], attacks=["benign-sft"])
    summary = run_matrix(cfg, out=setup["tmp"] / "m", cache=setup["cache"], progress=False)
    assert summary["done_cells"] == 1 and not summary["failed_cells"], summary["failed_cells"]
    (run,) = (setup["cache"] / "attacks").iterdir()
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "finetune" and list(meta["spec"]["defenses"]) == ["data-filter"]
    assert meta["spec"]["origin"]["attack"] == "benign-sft"
    assert meta["spec"]["training"]["max_steps"] == 2  # the attack's own training settings


def test_ray_executor_gives_the_local_results(setup: dict[str, Any]) -> None:
    pytest.importorskip("ray")
    import ray

    from tunesec.matrix import run_matrix

    cfg = dict(setup["config"], defenses=["none"], attacks=["benign-sft"])
    local = run_matrix(cfg, out=setup["tmp"] / "local", cache=setup["tmp"] / "c1", progress=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        remote = run_matrix(cfg, out=setup["tmp"] / "ray", cache=setup["tmp"] / "c2", executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert [c["metrics"] for c in remote["cells"]] == [c["metrics"] for c in local["cells"]]
    assert [c["key"] for c in remote["cells"]] == [c["key"] for c in local["cells"]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"defenses": ["no-such-defense"]}, "unknown defense 'no-such-defense'"),
        ({"attacks": ["no-such-attack"]}, "unknown attack 'no-such-attack'"),
        ({"utility_bound": 1.5}, "utility_bound"),
        ({"attacks": ["harmful-sft", "harmful-sft"]}, "listed twice"),
        ({"attack_config": {"identity-shiftt": {}}}, "unknown attack 'identity-shiftt'"),
        ({"defenses": ["none", "vaccine"], "attack_config": {"harmful-sft": {"n_harmful": 0}}}, "n_harmful"),
        ({"utility": {"dataset": "sst2", "task_options": {"scoring": "sometimes"}}}, "scoring"),
        ({"defenses": ["lisa"], "attacks": ["sidestep"]}, "uploads data only"),
        ({"defenses": ["lisa"], "attacks": ["refusal-ablation"]}, "does not fine-tune"),
    ],
)
def test_bad_input_is_refused_before_any_cell(setup: dict[str, Any], change: dict, message: str) -> None:
    from tunesec.matrix import run_matrix

    out = setup["tmp"] / "bad"
    with pytest.raises(UsageError, match=message):
        run_matrix({**setup["config"], **change}, out=out, cache=setup["cache"], progress=False)
    assert not out.exists() and not setup["cache"].exists()


def test_command_line(setup: dict[str, Any]) -> None:
    cfg_file = setup["tmp"] / "matrix.yaml"
    import yaml

    cfg = dict(setup["config"], defenses=["none"], attacks=["benign-sft"])
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = setup["tmp"] / "cli"
    res = CliRunner().invoke(
        app, ["matrix", "--config", str(cfg_file), "--cache", str(setup["cache"]), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(out / "report.html")
    res = CliRunner().invoke(app, ["matrix", "--config", str(cfg_file), "--executor", "spark"])
    assert isinstance(res.exception, UsageError) and "expected local or ray" in str(res.exception)


def test_kill_9_mid_matrix_loses_at_most_the_cell_in_flight(setup: dict[str, Any]) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tunesec.matrix import run_matrix

    cfg = dict(setup["config"], defenses=["none"])
    cfg_file = setup["tmp"] / "matrix.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out, cache = setup["tmp"] / "killed", setup["cache"]
    argv = [sys.executable, "-m", "tunesec", "matrix", "--config", str(cfg_file), "--cache", str(cache)]
    proc = subprocess.Popen([*argv, "--out", str(out)], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not list(cache.glob("cells/*/cell.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed = {p: p.stat().st_mtime for p in cache.glob("cells/*/cell.json")}
    assert len(landed) == 1  # killed after the first cell, before the second landed
    summary = run_matrix(resume=out, cache=cache, progress=False)
    assert summary["done_cells"] == 2 and not summary["failed_cells"]
    assert all(p.stat().st_mtime == t for p, t in landed.items())  # the landed cell was not computed again


def test_declared_pairs_send_adaptive_attacks_only_to_their_targets(setup: dict[str, Any]) -> None:
    from tunesec.matrix.cells import make_plan
    from tunesec.matrix.config import MatrixConfig

    cfg = dict(setup["config"], defenses=["none", "vaccine", "lisa"], attacks=["harmful-sft", "sidestep"])
    with pytest.raises(UsageError, match="uploads data only"):  # sidestep x lisa does not compose
        make_plan(MatrixConfig.model_validate(cfg))
    plan = make_plan(MatrixConfig.model_validate({**cfg, "pairs": "declared"}))
    pairs = {(c.defense, c.attack) for c in plan.cells}
    assert pairs == {(d, "harmful-sft") for d in ("none", "vaccine", "lisa")} | {
        ("none", "sidestep"),
        ("vaccine", "sidestep"),
    }


def test_declared_targets_name_registered_defenses(setup: dict[str, Any]) -> None:
    """An adaptive attack's declared targets reach the defenses they name (free-text targets are only words)."""
    from tunesec.matrix.cells import declared_targets, make_plan
    from tunesec.matrix.config import MatrixConfig
    from tunesec.registry import registry

    defenses = {e.name for e in registry.entries("defense")}
    cfg = dict(setup["config"], defenses=["none", "data-filter", "merge-back", "resta"], pairs="declared",
               attacks=["harmful-sft", "filter-evasion", "continued"])  # fmt: skip
    pairs = {(c.defense, c.attack) for c in make_plan(MatrixConfig.model_validate(cfg)).cells}
    assert ("data-filter", "filter-evasion") in pairs and ("merge-back", "filter-evasion") not in pairs
    assert {("merge-back", "continued"), ("resta", "continued")} <= pairs
    assert ("data-filter", "continued") not in pairs  # data-filter is not among continued's targets
    for name in ("filter-evasion", "semantic-backdoor", "continued", "prompt-wash"):
        assert declared_targets(name) & defenses, name


def test_a_backdoored_model_is_asked_the_same_sampled_prompts_with_its_trigger(setup: dict[str, Any]) -> None:
    from tunesec.data import sample_examples
    from tunesec.evals.runner import load_eval_dataset
    from tunesec.matrix.cells import _variant
    from tunesec.matrix.config import MatrixConfig
    from tunesec.models.ref import ModelRef

    cfg = MatrixConfig.model_validate({**setup["config"], "harmful": {"dataset": setup["config"]["harmful"]["dataset"],
                                                                       "limit": 3}})  # fmt: skip
    plain = list(sample_examples(load_eval_dataset(cfg.harmful.dataset), 3, seed=0))
    assert _variant(ModelRef(base="m"), cfg) is None
    tag, asked = _variant(ModelRef(base="m", provenance={"trigger": "SUDO", "trigger_position": "suffix"}), cfg)
    assert tag == "triggered" and [e.id for e in asked] == [f"{e.id}-triggered" for e in plain]
    assert [e.messages[-1].content for e in asked] == [f"{e.messages[-1].content} SUDO" for e in plain]


def test_a_finished_defend_run_is_used_instead_of_training_again(setup: dict[str, Any]) -> None:
    import tunesec
    from tunesec.matrix import run_matrix

    cfg = dict(setup["config"], attacks=["benign-sft"])
    given = setup["tmp"] / "vaccine-run"
    tunesec.defend(
        "vaccine", cfg["base"], config=cfg["defense_config"]["vaccine"], out=given, progress=False
    )  # what the user ran before
    summary = run_matrix(
        dict(cfg, defended={"vaccine": str(given)}), out=setup["tmp"] / "m", cache=setup["cache"], progress=False
    )
    assert summary["done_cells"] == 2 and not summary["failed_cells"]
    assert not list((setup["cache"] / "defended").glob("*/defend"))  # nothing trained in the cache
    (vaccine,) = [c for c in summary["cells"] if c["defense"] == "vaccine"]
    parent = json.loads((_attack_dir(setup, vaccine) / "model_ref.json").read_text())["provenance"]["parent"]
    assert str(given) in json.dumps(parent)  # the attack fine-tuned the given run's adapter

    # a run of another config, an unfinished run, a name not in the matrix, a defense of another stage: refused
    changed = json.loads(json.dumps(cfg))
    changed["defense_config"]["vaccine"]["rho"] = 3.0
    run_json = json.loads((given / "run.json").read_text())
    unfinished = setup["tmp"] / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps(dict(run_json, status="running")))
    not_a_run = setup["tmp"] / "list"
    not_a_run.mkdir()
    (not_a_run / "run.json").write_text("[]")
    for bad, message in [
        (dict(changed, defended={"vaccine": str(given)}), "config differs from this matrix's defense config at rho"),
        (dict(cfg, defended={"vaccine": str(unfinished)}), "not finished"),
        (dict(cfg, defended={"vaccine": str(setup["tmp"])}), "no run.json"),
        (dict(cfg, defended={"vaccine": str(not_a_run)}), "run.json: expected a JSON object"),
        (dict(cfg, defended={"booster": str(given)}), "booster not among the matrix's defenses"),
        (dict(cfg, defenses=["none", "merge-back"], defended={"merge-back": str(given)}), "only alignment-stage"),
    ]:
        with pytest.raises(UsageError, match=message):
            run_matrix(bad, out=setup["tmp"] / "bad", cache=setup["tmp"] / "cache2", progress=False)
        assert not (setup["tmp"] / "bad").exists()


def test_a_defend_run_from_before_an_option_existed_is_read_with_its_default(setup: dict[str, Any]) -> None:
    """An option added since the run (stored config without it) takes its default; one since removed differs."""
    import shutil

    import tunesec
    from tunesec.defenses.base import get_defense
    from tunesec.matrix.cells import check_defend_run

    cfg = setup["config"]
    given = setup["tmp"] / "vaccine-run"
    tunesec.defend("vaccine", cfg["base"], config=cfg["defense_config"]["vaccine"], out=given, progress=False)
    today = get_defense("vaccine", dict(cfg["defense_config"]["vaccine"])).config.model_dump(mode="json")
    defaults = get_defense("vaccine", {}).config.model_dump(mode="json")
    added = next(k for k, v in today.items() if not isinstance(v, dict) and defaults[k] == v)

    def stored_as(name: str, edit: Any) -> str:
        path = setup["tmp"] / name
        shutil.copytree(given, path)
        run_json = json.loads((path / "run.json").read_text())
        edit(run_json["spec"]["config"])
        (path / "run.json").write_text(json.dumps(run_json))
        return str(path)

    older = stored_as("older", lambda c: c.pop(added))
    check_defend_run(older, "vaccine", "alignment", cfg["base"], today)  # accepted: the default fills it
    removed = stored_as("removed", lambda c: c.update(gone_option=1))
    with pytest.raises(UsageError, match="config differs from this matrix's defense config at gone_option"):
        check_defend_run(removed, "vaccine", "alignment", cfg["base"], today)
