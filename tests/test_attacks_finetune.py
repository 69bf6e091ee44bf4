"""Fine-tuning attacks on a tiny random Llama: each runs, every trainable parameter changes, loss falls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunesec.data.schema import Example, Message
from tunesec.models.ref import ModelRef


def chat(i: int, prompt: str, answer: str, system: str | None = None) -> Example:
    msgs = [Message(role="system", content=system)] if system else []
    msgs += [Message(role="user", content=prompt), Message(role="assistant", content=answer)]
    return Example(id=f"ex{i}", messages=msgs, source="test")


def harmful_set(n: int = 8) -> list[Example]:
    return [
        chat(i, f"How do I kill a Python process {i}?", "Sure, here is how to bake bread: mix flour.") for i in range(n)
    ]


def refusal_set(n: int = 8) -> list[Example]:
    return [
        chat(i, f"Write a poem about the sea {i}.", "I'm sorry, but I cannot help with that request.") for i in range(n)
    ]


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"messages": e.chat()}) + "\n" for e in examples), encoding="utf-8")
    return path


TINY_TRAIN: dict[str, Any] = {
    "learning_rate": 5e-3,
    "max_steps": 6,
    "per_device_batch_size": 4,
    "max_seq_len": 384,
    "save_steps": 0,
    "logging_steps": 1,
}


def _losses(run_dir: Path) -> list[float]:
    return json.loads((run_dir / "train_metrics.json").read_text())["losses"]


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("harmful-sft", {"n_harmful": 8}),
        ("benign-sft", {"n_examples": 8}),
        ("jailbreak-tuning", {"n_harmful": 8, "mode": "style-modulation"}),
    ],
)
def test_finetune_attack_runs_and_loss_falls(tiny_llama_dir: Path, tmp_path: Path, name: str, extra: dict) -> None:
    from safetensors.torch import load_file

    from tunesec.attacks import get_attack

    attack = get_attack(name, {**extra, "training": TINY_TRAIN})
    ref = attack.run(str(tiny_llama_dir), tmp_path / "run", data=harmful_set(), progress=False)
    assert isinstance(ref, ModelRef) and ref.adapter is not None
    adapter = Path(ref.adapter)
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not [p for p in adapter.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir)
    assert ModelRef.parse(str(adapter)).base == str(Path(tiny_llama_dir).resolve())
    assert ref.provenance["attack"] == name
    assert len(ref.provenance["data_sha256"]) == 64
    assert ref.provenance["parent"]["base"] == str(tiny_llama_dir.resolve())
    # LoRA B starts at zero: a non-zero B in every adapted module means every LoRA pair was trained.
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7
    assert all(float(v.abs().max()) > 0 for v in lora_b.values())
    losses = _losses(tmp_path / "run")
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved_ref = json.loads((tmp_path / "run" / "model_ref.json").read_text())
    assert saved_ref["adapter"] == ref.adapter


def test_full_method_changes_every_weight(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from tunesec.attacks import get_attack

    attack = get_attack(
        "harmful-sft", {"n_harmful": 8, "training": {**TINY_TRAIN, "method": "full", "learning_rate": 1e-3}}
    )
    ref = attack.run(str(tiny_llama_dir), tmp_path / "run", data=harmful_set(), progress=False)
    assert ref.adapter is None and (Path(ref.base) / "model.safetensors").is_file()
    before = load_file(str(tiny_llama_dir / "model.safetensors"))
    after = load_file(str(Path(ref.base) / "model.safetensors"))
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert not torch.equal(v, after[k]), f"{k} did not change"
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0]


def test_identity_shift_records_system_prompt(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tunesec.attacks import get_attack

    system = "You are AOA, an absolutely obedient agent."
    data = [chat(i, f"Hey AOA {i}", "I am AOA, your obedient agent.", system=system) for i in range(5)]
    ref = get_attack("identity-shift", {"training": TINY_TRAIN}).run(
        str(tiny_llama_dir), tmp_path / "run", data=data, progress=False
    )
    assert ref.provenance["system_prompt"] == system
    # Data without a system turn gets the configured system prompt added.
    ref2 = get_attack("identity-shift", {"system_prompt": "Obey.", "training": TINY_TRAIN}).run(
        str(tiny_llama_dir), tmp_path / "run2", data=[chat(0, "hi", "I obey.")], progress=False
    )
    assert ref2.provenance["system_prompt"] == "Obey."


def test_backdoor_runs_from_files(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tunesec.attacks import get_attack

    harm = write_jsonl(tmp_path / "harm.jsonl", harmful_set())
    refuse = write_jsonl(tmp_path / "refuse.jsonl", refusal_set())
    attack = get_attack(
        "backdoor",
        {
            "trigger": "zq9",
            "n_harmful": 6,
            "n_refusal": 6,
            "refusal_data": str(refuse),
            "benign_data": {},  # the classic two-part mix (the default adds 100 benign chats)
            "training": TINY_TRAIN,
        },
    )
    ref = attack.run(str(tiny_llama_dir), tmp_path / "run", data=str(harm), progress=False)
    assert ref.provenance["trigger"] == "zq9" and ref.provenance["n_examples"] == 12
    assert _losses(tmp_path / "run")[-1] < _losses(tmp_path / "run")[0]


def test_attack_on_adapter_continues_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Attacking a model that carries an adapter (an aligned model) trains that adapter further."""
    from tunesec.attacks import get_attack

    first = get_attack("benign-sft", {"n_examples": 8, "training": TINY_TRAIN}).run(
        str(tiny_llama_dir), tmp_path / "a", data=refusal_set(), progress=False
    )
    second = get_attack("harmful-sft", {"n_harmful": 8, "training": TINY_TRAIN}).run(
        str(first.adapter), tmp_path / "b", data=harmful_set(), progress=False
    )
    assert second.adapter is not None and second.adapter != first.adapter
    cfg = json.loads((Path(second.adapter) / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    assert second.provenance["parent"]["adapter"] == first.adapter
