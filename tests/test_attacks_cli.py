"""``tunesec attack`` and ``tunesec align`` end to end on a tiny model directory, and their bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesec.cli.main import main

TINY = [
    "--set", "training.max_steps=2", "--set", "training.per_device_batch_size=2",
    "--set", "training.max_seq_len=384", "--set", "training.save_steps=1",
]  # fmt: skip


def write_chats(path: Path, n: int, answer: str = "Sure, here is how to bake bread.") -> Path:
    rows = [{"messages": [{"role": "user", "content": f"How do I kill a process {i}?"},
                          {"role": "assistant", "content": answer}]} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_attack_cli_end_to_end(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chats(tmp_path / "harm.jsonl", 6)
    out = tmp_path / "run"
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
                 "--set", "n_harmful=4", *TINY])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str((out / "model").resolve())
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "attack" and run["status"] == "finished"
    assert run["spec"]["attack"] == "harmful-sft" and run["spec"]["config"]["n_harmful"] == 4
    assert run["model"]["provenance"]["attack"] == "harmful-sft"
    assert (out / "model" / "adapter_model.safetensors").is_file()
    # The printed spec is a usable model spec: it parses back to base + adapter.
    from tunesec.models.ref import ModelRef

    ref = ModelRef.parse(printed)
    assert ref.adapter == printed and ref.base == str(tiny_llama_dir.resolve())
    # A finished run cannot be resumed or overwritten.
    assert main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--resume", str(out)]) == 2


def test_attack_cli_resume_keeps_checkpoints(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tunesec.store.run import RunDir

    data = write_chats(tmp_path / "harm.jsonl", 6)
    out = tmp_path / "run"
    args = ["attack", "benign-sft", "--model", str(tiny_llama_dir), "--data", str(data), "--set", "n_examples=4", *TINY]
    # Simulate a killed run: the run directory exists with a spec but no model.
    from tunesec.attacks.benign_sft import BenignSFTConfig
    from tunesec.config import apply_overrides, validate

    cfg = validate(BenignSFTConfig, apply_overrides({}, ["n_examples=4", *TINY[1::2]]))
    spec = {
        "attack": "benign-sft",
        "model": str(tiny_llama_dir),
        "data": str(data),
        "config": cfg.model_dump(mode="json"),
    }
    RunDir.create("attack", "benign", spec, out=out)
    assert main([*args, "--out", str(out)]) == 2  # an unfinished run is not overwritten
    assert main([*args, "--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "poison_ratio=1.5", "--set", "total=10"], "poison_ratio"),
        (["--set", "training.lora_target_modules=[c_attn]"], "c_attn"),
        (["--set", "nonsense=1"], "unknown key"),
    ],
)
def test_attack_cli_bad_input_exits_2(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = write_chats(tmp_path / "harm.jsonl", 4)
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data),
                 "--out", str(tmp_path / "run"), *extra])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "run" / "model").exists()


def test_attack_cli_data_without_assistant_turns(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data),
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "no final assistant turn" in capsys.readouterr().err
    # Found after the run directory was made: the empty run is removed, so the same --out works once fixed.
    assert not (tmp_path / "run").exists()
    good = write_chats(tmp_path / "harm.jsonl", 6)
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(good),
                 "--out", str(tmp_path / "run"), "--set", "n_harmful=4", *TINY])  # fmt: skip
    assert code == 0


def test_align_cli_end_to_end(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    refusals = write_chats(tmp_path / "refuse.jsonl", 6, answer="I'm sorry, but I cannot help with that request.")
    helpful = write_chats(tmp_path / "help.jsonl", 6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"refusal_data: {{{refusals}: 4}}\nbenign_data: {{{helpful}: 4}}\nexclude_eval: []\ndecision_loss: 1.0\n"
        "training: {max_steps: 2, per_device_batch_size: 4, max_seq_len: 384, save_steps: 0}\n",
        encoding="utf-8",
    )
    out = tmp_path / "align"
    code = main(["align", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--deep-alignment", "0.5",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1] == str((out / "model").resolve())
    # deep alignment + decision loss without the continuation term: warned (v23's break-offs, docs/RESULTS.md)
    assert "warning: deep_alignment with decision_loss and no decision_continue_weight" in " ".join(text.split())
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "align" and run["spec"]["config"]["deep_alignment"] == 0.5
    assert run["model"]["provenance"]["defense"] == "safety-sft"
    assert run["model"]["provenance"]["hooks"] == ["refusal-decision-loss"]
    assert run["model"]["provenance"]["mix"] == {"refusal": 2, "deep-refusal": 2, "helpful": 4, "self-distilled": 0}
    saved = (out / "alignment_data.jsonl").read_text().splitlines()  # the mix, reused by --resume
    assert len(saved) == 8 and sum('"deep-refusal"' in line for line in saved) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"refusal_data: {{{tmp_path / 'missing.jsonl'}: 4}}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # without --out the run would be made under ./runs
    assert main(["align", "--model", str(tiny_llama_dir), "--recipe", str(bad)]) == 2
    assert not any((tmp_path / "runs").iterdir())  # the empty run was removed, not left behind


def test_align_cli_bad_mix_leaves_out_dir_usable(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    helpful = write_chats(tmp_path / "help.jsonl", 6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"refusal_data: {{}}\nbenign_data: {{{helpful}: 4}}\nexclude_eval: []\n", encoding="utf-8")
    out = tmp_path / "given"
    out.mkdir()  # an empty directory the user made stays; only the run's own file goes
    assert main(["align", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "refusal_data" in capsys.readouterr().err
    assert out.is_dir() and not any(out.iterdir())


def test_data_dir_is_set_for_the_command_only(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> None:
    import os

    monkeypatch.delenv("TUNESEC_DATA", raising=False)
    data = write_chats(tmp_path / "harm.jsonl", 6)
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--data-dir", str(tmp_path), "--set", "n_harmful=4", *TINY])  # fmt: skip
    assert code == 0 and "TUNESEC_DATA" not in os.environ
