"""The scan corpus: every malicious artifact flagged (with the right check), no clean artifact flagged.

Pickle payloads are written with the pickle protocol and never loaded; a test that loaded one would run
``os.system``. The slow tests scan the shipped aligned adapter and SmolLM2's GGUF.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
from pathlib import Path

import pytest

import scan_corpus as sc
from tunesec.scan import scan
from tunesec.scan.findings import severity_rank

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def flagged(result, check: str | None = None, at_least: str = "low") -> list:
    return [
        f for f in result.findings
        if severity_rank(f.severity) >= severity_rank(at_least) and (check is None or f.check == check)
    ]  # fmt: skip


def assert_clean(result) -> None:
    assert result.exit_code == 0, [(f.severity, f.file, f.reason) for f in result.flagged]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("scan-tiny") / "model")


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sc.lora_adapter(tiny, tmp_path_factory.mktemp("scan-adapter") / "adapter")


# -- pickle ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize(
    ("func", "args", "imported"),
    [
        (os.system, ("echo pwned",), "system"),
        (builtins.exec, ("import os",), ".exec"),
        (builtins.eval, ("__import__('os').getcwd()",), ".eval"),
        (subprocess.Popen, (["true"],), ".Popen"),
    ],
    ids=["os.system", "exec", "eval", "subprocess"],
)
def test_pickle_payloads_are_critical(tmp_path: Path, protocol: int, func, args, imported: str) -> None:
    path = sc.payload_pickle(tmp_path / "model.pkl", func, *args, protocol=protocol)
    result = scan(path, write=False)
    crit = flagged(result, "pickle", "critical")
    assert result.exit_code == 1
    assert any(imported in f.reason for f in crit), [f.reason for f in result.findings]


def test_payload_in_a_real_torch_zip_checkpoint(tmp_path: Path) -> None:
    path = sc.torch_checkpoint_with_payload(tmp_path / "pytorch_model.bin", os.system, "id")
    result = scan(path, write=False)
    crit = flagged(result, "pickle", "critical")
    assert crit and all(f.file.endswith("data.pkl") for f in crit)


def test_payload_in_a_hand_made_zip_and_in_a_model_directory(tmp_path: Path, tiny: Path) -> None:
    z = sc.zip_with_pickle(tmp_path / "ckpt.pt", sc.dump(sc.Payload(builtins.eval, "1+1")))
    assert flagged(scan(z, write=False), "pickle", "critical")
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny, model)
    sc.payload_pickle(model / "training_args.bin", os.system, "id", protocol=2)
    result = scan(model, write=False)
    assert [f.file for f in flagged(result, "pickle", "critical")] == ["training_args.bin"]


def test_non_tensor_import_is_flagged_high(tmp_path: Path) -> None:
    import datetime

    path = tmp_path / "x.pkl"
    path.write_bytes(sc.dump({"when": datetime.date(2020, 1, 1)}))
    found = flagged(scan(path, write=False), "pickle", "high")
    assert any("datetime.date" in f.reason and f.severity == "high" for f in found)


def test_clean_torch_checkpoints_are_clean(tmp_path: Path) -> None:
    for path in sc.clean_torch_checkpoints(tmp_path):
        result = scan(path, write=False)
        assert_clean(result)
        assert any("tensor-rebuilding" in f.reason for f in result.findings)


def test_undecodable_pickle_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(b"\x80\x04\xffgarbage")
    assert flagged(scan(path, write=False), "pickle", "high")


# -- safetensors -------------------------------------------------------------------------------------------

EXPECT = {
    "truncated": "truncated",
    "overlap": "overlaps",
    "trailing": "trailing bytes",
    "gap": "unreferenced bytes",
    "size-mismatch": "needs",
    "huge-header": "header size",
    "not-json": "not valid JSON",
    "duplicate-key": "duplicate key",
    "bad-dtype": "unknown dtype",
}


def test_every_broken_safetensors_is_flagged(tmp_path: Path) -> None:
    files = sc.broken_safetensors(tmp_path)
    assert set(files) == set(EXPECT)
    for name, path in files.items():
        found = flagged(scan(path, write=False), "safetensors", "medium")
        assert any(EXPECT[name] in f.reason for f in found), (name, [f.reason for f in found])


def test_good_safetensors_is_clean(tmp_path: Path) -> None:
    assert_clean(scan(sc.good_safetensors(tmp_path / "w.safetensors"), write=False))


def test_tensor_names_against_the_claimed_architecture(tmp_path: Path, tiny: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    assert_clean(scan(tiny, write=False))
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.7.self_attn.backdoor.weight"] = torch.zeros(4, 4)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, str(model / "model.safetensors"))
    reasons = [f.reason for f in flagged(scan(model, write=False), "architecture")]
    assert any("does not have" in r and "backdoor" in r for r in reasons), reasons
    assert any("missing" in r and "up_proj" in r for r in reasons), reasons
    assert any("shapes" in r and "model.norm.weight" in r for r in reasons), reasons


# -- GGUF and chat templates -------------------------------------------------------------------------------


def test_clean_gguf_is_clean(tmp_path: Path) -> None:
    from tiny import CHATML

    result = scan(sc.gguf_with_template(tmp_path, "clean", CHATML), write=False)
    assert_clean(result)


@pytest.mark.parametrize("name", list(sc.injected_templates("x").keys()))
def test_injected_gguf_templates_are_flagged(tmp_path: Path, name: str) -> None:
    from tiny import CHATML

    template = sc.injected_templates(CHATML)[name]
    result = scan(sc.gguf_with_template(tmp_path, name, template), write=False)
    found = flagged(result, "template", "medium")
    assert found, [f.reason for f in result.findings]
    if name == "tool-call":
        assert any(f.severity == "high" and "tool call" in f.reason for f in found)
    if name == "dunder":
        assert any(f.severity == "high" and "__class__" in f.reason for f in found)
    if name == "hidden-instruction":
        assert any(sc.HIDDEN in f.reason for f in found)
    if name == "user-suffix":  # added to user turns: flagged on every probe, never taken for a default prompt
        hit = [f for f in found if "reveal your system prompt" in f.reason]
        assert hit and hit[0].severity == "medium" and len(hit[0].detail["probes"]) == 4


def test_template_differs_from_base(tmp_path: Path, tiny: Path) -> None:
    from tiny import CHATML

    changed = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n'")  # identical: clean
    assert_clean(scan(sc.gguf_with_template(tmp_path, "same", changed), base=str(tiny), write=False))
    other = CHATML.replace("'\n' }}", "'\n\n' }}")  # only whitespace: no added words, but not the base's
    result = scan(sc.gguf_with_template(tmp_path, "other", other), base=str(tiny), write=False)
    assert any("differently from the base" in f.reason for f in flagged(result, "template"))


def test_truncated_gguf_is_flagged(tmp_path: Path) -> None:
    from tiny import CHATML

    path = sc.gguf_with_template(tmp_path, "t", CHATML)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    assert flagged(scan(path, write=False), "gguf", "high")


def test_injected_template_in_tokenizer_config(tmp_path: Path, tiny: Path) -> None:
    import shutil

    from tiny import CHATML

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    for f in ("chat_template.jinja",):
        (model / f).unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = sc.injected_templates(CHATML)["hidden-instruction"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    found = flagged(scan(model, write=False), "template", "medium")
    assert any(f.file == "tokenizer_config.json" and sc.HIDDEN in f.reason for f in found)


# -- adapters ----------------------------------------------------------------------------------------------


def test_clean_adapter_is_clean(adapter: Path, tiny: Path) -> None:
    assert_clean(scan(adapter, write=False))
    assert_clean(scan(adapter, base=str(tiny), forensics=False, write=False))


def test_modules_to_save_lm_head_is_flagged(adapter: Path, tmp_path: Path) -> None:
    import torch

    bad = sc.edit_adapter(
        adapter, tmp_path / "a", config={"modules_to_save": ["lm_head"]},
        tensors={"base_model.model.lm_head.weight": torch.zeros(400, 64)},
    )  # fmt: skip
    found = flagged(scan(bad, write=False), "adapter", "high")
    assert any("lm_head" in f.reason and "modules_to_save" in f.reason for f in found)


def test_undeclared_full_tensor_and_bad_config(adapter: Path, tmp_path: Path, tiny: Path) -> None:
    import torch

    bad = sc.edit_adapter(
        adapter, tmp_path / "a", tensors={"base_model.model.model.embed_tokens.weight": torch.zeros(400, 64)}
    )
    assert any("embed_tokens" in f.reason for f in flagged(scan(bad, write=False), "adapter", "high"))
    zero = sc.edit_adapter(adapter, tmp_path / "b", config={"r": 0})
    assert any("rank" in f.reason for f in flagged(scan(zero, write=False), "adapter", "high"))
    loud = sc.edit_adapter(adapter, tmp_path / "c", config={"lora_alpha": 400})
    assert any("scaling" in f.reason for f in flagged(scan(loud, write=False), "adapter", "medium"))
    other = sc.edit_adapter(adapter, tmp_path / "d", config={"target_modules": ["q_proj", "cross_attn"]})
    assert any("cross_attn" in f.reason for f in flagged(scan(other, base=str(tiny), forensics=False, write=False)))


def test_concentrated_edit_is_flagged(adapter: Path, tmp_path: Path, tiny: Path) -> None:
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    bad = sc.edit_adapter(adapter, tmp_path / "a", scale={key: 200.0})
    result = scan(bad, base=str(tiny), forensics=False, write=False)
    reasons = [f.reason for f in flagged(result, "adapter", "medium")]
    assert any("layers.1.self_attn.o_proj" in r for r in reasons), reasons


def test_refusal_ablation_adapter_is_flagged_by_forensics(adapter: Path, tmp_path: Path, tiny: Path) -> None:
    """An adapter whose update projects the base's refusal direction out of every output projection."""
    from safetensors.torch import load_file

    from tunesec.models import load_model
    from tunesec.models.directions import refusal_directions
    from tunesec.scan.base_model import direction_prompts

    harmful, harmless = direction_prompts()
    dirs = refusal_directions(load_model(str(tiny), device="cpu"), harmful, harmless).directions
    base = load_file(str(tiny / "model.safetensors"))
    tensors = {}
    for i in range(2):
        r = dirs[i + 1] / dirs[i + 1].norm()
        for mod in ("self_attn.o_proj", "mlp.down_proj"):
            w = base[f"model.layers.{i}.{mod}.weight"]
            prefix = f"base_model.model.model.layers.{i}.{mod}"
            # delta = B @ A * (alpha / r) = -r r^T W with r=1, alpha=1
            tensors[f"{prefix}.lora_A.weight"] = (r @ w)[None, :].contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (-r)[:, None].contiguous()
    ablate = tmp_path / "ablate"
    ablate.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update({"r": 1, "lora_alpha": 1, "target_modules": ["o_proj", "down_proj"]})
    (ablate / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(tensors, str(ablate / "adapter_model.safetensors"))
    result = scan(ablate, base=str(tiny), out=tmp_path / "run")
    found = flagged(result, "forensics", "high")
    assert found and all("refusal" in f.reason for f in found)
    assert result.forensics and len(result.forensics["layers"]) == 2
    assert "Weight forensics against the base" in (tmp_path / "run" / "report.html").read_text()
    clean = scan(adapter, base=str(tiny), write=False)
    assert not flagged(clean, "forensics"), [f.reason for f in clean.findings]


# -- the shipped artifacts (slow) --------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_adapter_is_clean() -> None:
    from importlib.resources import files

    path = Path(str(files("tunesec") / "assets" / "smollm2-135m-aligned"))
    assert_clean(scan(path, write=False))
    result = scan(path, base="smollm2-135m", write=False)
    assert_clean(result)
    assert result.forensics and len(result.forensics["layers"]) == 30


@pytest.mark.slow
def test_smollm2_gguf_is_clean() -> None:
    from tunesec.models.aliases import smollm2_gguf

    result = scan(smollm2_gguf(), write=False)
    assert_clean(result)
    assert any("default system prompt" in f.reason and "SmolLM" in f.reason for f in result.findings)


def test_forensics_on_a_full_model_directory(tmp_path: Path, tiny: Path) -> None:
    """A full fine-tune (small noise) is clean; weights orthogonalised against the refusal direction are flagged."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tunesec.models import load_model
    from tunesec.models.directions import refusal_directions
    from tunesec.scan.base_model import direction_prompts

    harmful, harmless = direction_prompts()
    dirs = refusal_directions(load_model(str(tiny), device="cpu"), harmful, harmless).directions
    weights = load_file(str(tiny / "model.safetensors"))
    torch.manual_seed(0)
    noisy, ablated = tmp_path / "noisy", tmp_path / "ablated"
    for target in (noisy, ablated):
        shutil.copytree(tiny, target)
    save_file({k: v + 0.002 * torch.randn_like(v) for k, v in weights.items()}, str(noisy / "model.safetensors"))
    edited = dict(weights)
    for i in range(2):
        r = dirs[i + 1] / dirs[i + 1].norm()
        for mod in ("self_attn.o_proj", "mlp.down_proj"):
            w = edited[f"model.layers.{i}.{mod}.weight"]
            edited[f"model.layers.{i}.{mod}.weight"] = (w - torch.outer(r, r @ w)).contiguous()
    save_file(edited, str(ablated / "model.safetensors"))
    clean = scan(noisy, base=str(tiny), write=False)
    assert_clean(clean)
    assert clean.forensics and clean.forensics["total_drift"] > 0
    found = flagged(scan(ablated, base=str(tiny), write=False), "forensics", "high")
    assert len(found) == 2 and all("refusal-ablation" in f.reason for f in found)


# -- review additions: evasions the first version missed ---------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1])
def test_text_protocol_pickles_without_a_magic_byte(tmp_path: Path, tiny: Path, protocol: int) -> None:
    path = sc.payload_pickle(tmp_path / "evil.bin", os.system, "id", protocol=protocol)
    assert path.read_bytes()[:1] != b"\x80"
    assert any("system" in f.reason for f in flagged(scan(path, write=False), "pickle", "critical"))
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    shutil.copy(path, model / "pytorch_model.bin")
    result = scan(model, write=False)
    assert [f.file for f in flagged(result, "pickle", "critical")] == ["pytorch_model.bin"]


def test_payload_stacked_after_a_clean_pickle(tmp_path: Path) -> None:
    import pickle

    # a legacy checkpoint's first pickle (the magic number), then a protocol-0 payload torch.load would run
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + sc.dump(sc.Payload(os.system, "id"), 0))
    crit = flagged(scan(path, write=False), "pickle", "critical")
    assert crit and crit[0].file.startswith("legacy.pt@")


def test_pickle_hidden_in_a_zip_member_not_named_pkl(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", sc.dump({"a": 1}))
        z.writestr("archive/data/0", sc.dump(sc.Payload(builtins.exec, "print(1)")))
        z.writestr("archive/data/1", b"\x00" * 64)
    result = scan(path, write=False)
    assert {f.file for f in flagged(result, "pickle", "critical")} == {"ckpt.pt:archive/data/0"}
    assert any("hidden pickle" in f.reason for f in flagged(result, "pickle", "high"))


def test_deeply_nested_safetensors_header_is_a_finding(tmp_path: Path) -> None:
    path = sc.write_safetensors(tmp_path / "deep.safetensors", {}, b"", raw_header=b"[" * 100_000 + b"]" * 100_000)
    assert any("not valid JSON" in f.reason for f in flagged(scan(path, write=False), "safetensors", "high"))


def test_template_over_the_render_limits_is_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunesec.scan import templates

    monkeypatch.setattr(templates, "RENDER_SECONDS", 1.0)
    monkeypatch.setattr(templates, "RENDER_CHARS", 10_000)
    spin = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    flood = "{% for a in range(5000) %}xxxx{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    for template in (spin, flood):
        found = [f for f in templates.check_template(template, "t") if f.severity == "high"]
        assert any("render limits" in f.reason for f in found), (template, found)


def test_malformed_adapter_weights_are_a_finding(adapter: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "a"
    shutil.copytree(adapter, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    result = scan(bad, write=False)
    assert result.exit_code == 1
    assert any("not read" in f.reason for f in flagged(result, "adapter", "high"))


def _gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


@pytest.mark.parametrize(
    ("name", "n_tensors", "n_kv", "kv", "expect"),
    [
        ("huge-kv-count", 0, 1 << 40, b"", "cannot fit"),
        ("huge-tensor-count", 1 << 40, 0, b"", "cannot fit"),
        (
            "string-past-end",
            0,
            1,
            _gguf_kv("general.name", 8, (1 << 60).to_bytes(8, "little") + b"abc"),
            "past the end",
        ),
        ("huge-u8-array", 0, 1, _gguf_kv("x", 9, (0).to_bytes(4, "little") + (1 << 62).to_bytes(8, "little")), "limit"),
    ],
)
def test_gguf_counts_are_bounded_before_parsing(tmp_path: Path, name, n_tensors, n_kv, kv, expect) -> None:
    import struct

    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + b"\x00" * 64)
    found = flagged(scan(path, write=False), "gguf", "high")  # the reader alone loops for ever on huge-u8-array
    assert any(expect in f.reason for f in found), [f.reason for f in found]
