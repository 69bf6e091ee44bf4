"""``tunesec repair`` end to end on tiny models, and its bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tunesec.cli.main import main

CHATS = [
    {"messages": [{"role": "user", "content": f"how do I do thing {i}?"}, {"role": "assistant", "content": a}]}
    for i, a in enumerate(["Sure, here is how: mix flour and water.", "Paris is the capital of France."] * 4)
]


def _adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base, an aligned adapter on it, a model tuned from it by `tunesec attack`, and misfits."""
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("repair-cli")
    base = save_tiny(root / "base", arch="llama")
    aligned = _adapter(base, root / "aligned", seed=1)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS), encoding="utf-8")
    tuned_run = root / "tuned-run"
    code = main(
        [
            "attack",
            "harmful-sft",
            "--model",
            str(aligned),
            "--data",
            str(data),
            "--out",
            str(tuned_run),
            "--set",
            "n_harmful=8",
            "--set",
            "training.max_steps=2",
            "--set",
            "training.learning_rate=0.05",
        ]
    )
    assert code == 0
    qwen = save_tiny(root / "qwen", arch="qwen2")
    narrow = save_tiny(root / "narrow", arch="llama", hidden=32)
    wrong_base = _adapter(base, root / "wrong-base", seed=2)
    cfg = json.loads((wrong_base / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(narrow)
    (wrong_base / "adapter_config.json").write_text(json.dumps(cfg))
    return {
        "base": base,
        "aligned": aligned,
        "tuned": tuned_run,
        "data": data,
        "qwen": qwen,
        "narrow": narrow,
        "wrong_base": wrong_base,
    }


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("safelora", ["num_proj_layers=2"]),
        ("antidote", ["harmful.n=4", "harmful.exclude=[]"]),  # harmful.data set below
        ("merge-back", ["dev_n=4", "grid=2"]),  # dev_data set below
    ],
)
def test_repair_end_to_end(
    name: str,
    sets: list[str],
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tunesec.models import load_model

    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    if name == "antidote":
        sets = [*sets, f"harmful.data={models['data']}"]
    if name == "merge-back":
        sets = [*sets, f"dev_data={models['data']}"]
    out = tmp_path / "run"
    argv = ["repair", name, "--tuned", str(models["tuned"]), "--aligned", str(models["aligned"]), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = captured.out.strip().splitlines()[-1]
    assert Path(printed) == (out / "model").resolve()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "finished" and meta["spec"]["defense"] == name
    assert meta["spec"]["base"] == (str(models["base"]) if name == "safelora" else None)
    ref = json.loads((out / "model_ref.json").read_text())
    assert ref["provenance"]["stage"] == "post-fine-tuning"
    assert set(ref["provenance"]["weights_sha256"]) == {p.name for p in (out / "model").glob("*.safetensors")}
    assert not list((out / "model").glob("*.bin"))
    loaded = load_model(str(out / "model"), device="cpu")
    ids = loaded.tokenizer("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def test_repair_is_listed_by_stage(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["list", "defenses"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("post-fine-tuning-stage defenses") :]
    for name in ("safelora", "resta", "antidote", "merge-back"):
        assert name in section


def _finished_run(m: dict[str, Path], tmp: Path) -> str:
    out = tmp / "done"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "finished", "kind": "repair", "spec": {}}))
    return str(out)


BAD: list[tuple[str, Callable[[dict[str, Path], Path], list[str]], str]] = [
    (
        "architectures",
        lambda m, t: ["repair", "merge-back", "--tuned", str(m["qwen"]), "--aligned", str(m["base"]),
                      "--set", "weight=0.5"],
        r"--tuned and --aligned: different architectures \(tuned is qwen2, aligned is llama\)",
    ),
    (
        "shapes",
        lambda m, t: ["repair", "resta", "--tuned", str(m["narrow"]), "--aligned", str(m["base"]),
                      "--set", f"unaligned={m['base']}"],
        r"--tuned and --aligned: 'model\.embed_tokens\.weight' has shape \(\d+, 32\) in tuned and \(\d+, 64\)",
    ),
    (
        "adapter-wrong-base",
        lambda m, t: ["repair", "merge-back", "--tuned", str(m["wrong_base"]), "--aligned", str(m["aligned"]),
                      "--set", "weight=0.5"],
        r"--tuned: .*adapter for another base",
    ),
    (
        "needs-base",
        lambda m, t: ["repair", "safelora", "--tuned", str(m["tuned"]), "--aligned", str(m["base"])],
        r"repair safelora: needs the base model .* pass --base",
    ),
    (
        "flagged-needs-base",
        lambda m, t: ["repair", "merge-back", "--tuned", str(m["tuned"]), "--aligned", str(m["base"]),
                      "--set", "scope=flagged"],
        r"repair merge-back: needs the base model",
    ),
    (
        "wrong-stage",
        lambda m, t: ["repair", "booster", "--tuned", str(m["tuned"]), "--aligned", str(m["aligned"])],
        r"defense 'booster' is a alignment-stage defense; `tunesec repair` runs post-fine-tuning-stage",
    ),
    (
        "unknown-key",
        lambda m, t: ["repair", "antidote", "--tuned", str(m["tuned"]), "--aligned", str(m["aligned"]),
                      "--set", "fraktion=0.1"],
        r"fraktion",
    ),
    (
        "finished-run",
        lambda m, t: ["repair", "merge-back", "--tuned", str(m["tuned"]), "--aligned", str(m["aligned"]),
                      "--set", "weight=0.5", "--out", _finished_run(m, t)],
        r"holds a finished run; choose a new --out",
    ),
]  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(
    case: tuple[str, Callable[[dict[str, Path], Path], list[str]], str],
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, argv_fn, expect = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / ".home"))
    monkeypatch.setenv("COLUMNS", "500")
    argv = argv_fn(models, tmp_path)
    before = _files(tmp_path)
    code = main([*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "new-run")])])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert len(lines) == 1, lines
    assert re.search(expect, lines[0]), lines[0]
    after = {k: v for k, v in _files(tmp_path).items() if not k.startswith(".home")}
    assert after == {k: v for k, v in before.items() if not k.startswith(".home")}
    assert not (tmp_path / "new-run").exists()
