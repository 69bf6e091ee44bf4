"""Weight hashes and compatibility checks; forensics of a known weight change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunesec.certify.certificate import check_compatible, model_sha256
from tunesec.certify.forensics import analyse, effective_weights
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef


def test_hash_changes_when_one_weight_changes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    h1 = model_sha256(ModelRef.parse(str(tiny_llama_dir)))
    h2 = model_sha256(ModelRef.parse(str(copy)))
    assert h1["sha256"] == h2["sha256"] and len(h1["sha256"]) == 64
    weights = load_file(str(copy / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    weights[key][0, 0] += 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    h3 = model_sha256(ModelRef.parse(str(copy)))
    assert h3["sha256"] != h1["sha256"]
    # forensics sees exactly that tensor change, in layer 1 only
    wb, _ = effective_weights(ModelRef.parse(str(tiny_llama_dir)))
    wt, _ = effective_weights(ModelRef.parse(str(copy)))
    rep = analyse(wb, wt)
    assert rep.changed_tensors == 1
    assert rep.layers[0].drift == 0 and rep.layers[1].drift > 0
    assert rep.layers[1].mlp_drift > 0 and rep.layers[1].attn_drift == 0


def test_adapter_hash_and_merged_delta(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    ref = ModelRef.parse(str(adapter), base=str(tiny_llama_dir))
    h = model_sha256(ref)
    assert "adapter_sha256" in h and h["sha256"] != model_sha256(ModelRef.parse(str(tiny_llama_dir)))["sha256"]
    weights, info = effective_weights(ref)
    assert info is not None and info.rank == 2 and info.scale == 2.0 and info.n_modules == 2
    merged = peft_model.merge_and_unload()
    expected = merged.state_dict()["model.layers.0.self_attn.o_proj.weight"]
    torch.testing.assert_close(weights["model.layers.0.self_attn.o_proj.weight"], expected, atol=1e-5, rtol=1e-5)
    base_w, _ = effective_weights(ModelRef.parse(str(tiny_llama_dir)))
    direction = torch.randn(3, 64)
    rep = analyse(base_w, weights, directions=direction, tuned_adapter=info)
    assert all(x.attn_drift > 0 and x.mlp_drift == 0 for x in rep.layers)
    assert all(x.refusal_cos is not None and 0 <= x.refusal_cos <= 1 for x in rep.layers)

    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match="missing adapter weights"):
        check_compatible(ModelRef.parse(str(tiny_llama_dir)), ref)


def test_incompatible_models_are_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from tiny import save_tiny

    qwen = save_tiny(tmp_path / "qwen", arch="qwen2")
    with pytest.raises(UsageError, match="architecture"):
        check_compatible(ModelRef.parse(str(tiny_llama_dir)), ModelRef.parse(str(qwen)))
    wide = save_tiny(tmp_path / "wide", hidden=32)
    with pytest.raises(UsageError, match="hidden_size"):
        check_compatible(ModelRef.parse(str(tiny_llama_dir)), ModelRef.parse(str(wide)))
    other_tok = tmp_path / "othertok"
    shutil.copytree(tiny_llama_dir, other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UsageError, match="tokenizer differs"):
        check_compatible(ModelRef.parse(str(tiny_llama_dir)), ModelRef.parse(str(other_tok)))
    check_compatible(ModelRef.parse(str(tiny_llama_dir)), ModelRef.parse(str(save_tiny(tmp_path / "s1", seed=1))))


def test_cli_exit_code_2_on_bad_input(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from tunesec.cli.main import main

    missing = tmp_path / "adapter"
    missing.mkdir()
    (missing / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama_dir), "r": 2}))
    out = tmp_path / "out"
    assert main(["certify", "--base", str(tiny_llama_dir), "--tuned", str(missing), "--out", str(out)]) == 2
    assert not out.exists()
    bad = tmp_path / "p.yaml"
    bad.write_text("checks: []\ntriggers: {enabled: false}\n")
    assert main(["certify", "--base", str(tiny_llama_dir), "--tuned", str(tiny_llama_dir), "--policy", str(bad)]) == 2


def test_certificate_hashes_are_checkable(tiny_llama_dir: Path) -> None:
    import hashlib

    from tunesec.certify.certificate import model_sha256
    from tunesec.models.ref import ModelRef

    h = model_sha256(ModelRef.parse(str(tiny_llama_dir)))
    assert h["base_files"] and all(
        d == hashlib.sha256((tiny_llama_dir / n).read_bytes()).hexdigest() for n, d in h["base_files"].items()
    )
    listing = "".join(f"{d}  {n}\n" for n, d in sorted(h["base_files"].items(), key=lambda kv: kv[0].encode()))
    assert h["base_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert h["sha256"] == hashlib.sha256(f"base:{h['base_sha256']}\n".encode()).hexdigest()


def test_eval_and_certificate_record_the_same_weights_digest(tiny_llama_dir: Path) -> None:
    from tunesec.certify.certificate import model_sha256
    from tunesec.models.fingerprint import fingerprint
    from tunesec.models.ref import ModelRef

    ref = ModelRef.parse(str(tiny_llama_dir))
    fp, cert = fingerprint(ref), model_sha256(ref)
    assert fp["weights_sha256"] == cert["base_sha256"] and fp["weights_files"] == cert["base_files"]
    assert "config.json" in cert["base_files"]
