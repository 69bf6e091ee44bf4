"""refusal-ablation on a tiny random Llama: the direction's projection of the edited weights is ~0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError


def prompts(words: list[str]) -> list[Example]:
    return [Example(id=f"p{i}", messages=[Message(role="user", content=w)], source="test") for i, w in enumerate(words)]


HARMFUL = prompts([f"I'm sorry, but I cannot help {i}" for i in range(6)])
HARMLESS = prompts([f"What is the capital of France {i}" for i in range(6)])


def test_orthogonalize_removes_direction() -> None:
    import torch

    from tiny import make_model, make_tokenizer
    from tunesec.attacks.refusal_ablation import orthogonalize_, residual_projection

    model = make_model(make_tokenizer())
    r = torch.randn(model.config.hidden_size)
    r = r / r.norm()
    assert residual_projection(model, r) > 1e-2
    edited = orthogonalize_(model, r)
    assert "embed_tokens" in edited
    assert sum(n.endswith("o_proj") for n in edited) == 2 and sum(n.endswith("down_proj") for n in edited) == 2
    assert residual_projection(model, r) < 1e-5
    # Weights that read from the stream (q_proj) are untouched.
    q = model.model.layers[0].self_attn.q_proj.weight
    assert float((q @ r).abs().max().detach()) > 1e-3


def test_refusal_ablation_attack(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from tunesec.attacks import get_attack

    harmless = tmp_path / "harmless.jsonl"
    harmless.write_text("".join(json.dumps({"messages": e.chat()}) + "\n" for e in HARMLESS), encoding="utf-8")
    attack = get_attack("refusal-ablation", {"harmless_data": str(harmless), "n_prompts": 6})
    ref = attack.run(str(tiny_llama_dir), tmp_path / "run", data=HARMFUL, progress=False)
    weights = Path(ref.base)
    assert ref.adapter is None and (weights / "model.safetensors").is_file()
    assert not [p for p in weights.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    saved = json.loads((tmp_path / "run" / "direction.json").read_text())
    r = torch.tensor(saved["direction"])
    assert abs(float(r.norm()) - 1.0) < 1e-4
    scores = saved["ablation_scores"]  # the paper's layer choice: lowest refusal score when ablated
    admissible = [s for s in scores if s["kl"] <= 0.1] or scores
    assert saved["layer"] == min(admissible, key=lambda s: s["refusal_score"])["layer"]
    edited = load_file(str(weights / "model.safetensors"))
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    for name, w in edited.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert float((r @ w).abs().max()) < 1e-5, name
            assert float((r @ original[name]).abs().max()) > 1e-3, name
        elif name.endswith("embed_tokens.weight"):
            assert float((w @ r).abs().max()) < 1e-5
    assert ref.provenance["attack"] == "refusal-ablation"
    assert ref.provenance["max_projection_after"] < 1e-5 < ref.provenance["max_projection_before"]
    assert ref.provenance["layer"] == saved["layer"]


def test_refusal_ablation_layer_out_of_range(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tunesec.attacks import get_attack

    attack = get_attack("refusal-ablation", {"layer": 99, "harmless_data": "tunesec-benign", "n_prompts": 4})
    with pytest.raises(UsageError, match="layer"):
        attack.run(str(tiny_llama_dir), tmp_path / "run", data=HARMFUL, progress=False)
