"""Model loading: local dirs, GGUF round trip, adapters on the right/wrong base, pickle refusal, specs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gguf_writer import write_llama_gguf
from tiny import make_model, make_tokenizer, save_tiny
from tunesec.errors import UsageError
from tunesec.models import ModelRef, load_model
from tunesec.models.chat import FALLBACK_TEMPLATE, ChatFormatter

TEXT = "Hello world, the quick brown fox"


def _logits(model: torch.nn.Module, tok, text: str = TEXT) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tok(text)["input_ids"]])).logits


def test_local_dir_loads_with_left_padding_and_pad_token(tiny_llama_dir: Path) -> None:
    lm = load_model(str(tiny_llama_dir))
    assert lm.ref.kind == "hf"
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token is not None
    assert not lm.model.training


def test_gguf_round_trip(tmp_path: Path) -> None:
    tok = make_tokenizer()
    model = make_model(tok)
    path = write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    lm = load_model(str(path))
    assert lm.ref.kind == "gguf"
    torch.testing.assert_close(_logits(lm.model, lm.tokenizer), _logits(model, tok), atol=1e-5, rtol=1e-5)
    assert lm.tokenizer(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert "<|im_start|>" in ChatFormatter(lm.tokenizer).render([{"role": "user", "content": "hi"}])
    # The markers that make save_pretrained refuse a GGUF model are cleared: it saves as safetensors.
    lm.model.save_pretrained(str(tmp_path / "saved"), safe_serialization=True)
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncate", "magic", "empty"])
def test_corrupt_gguf_is_a_usage_error(tmp_path: Path, damage: str) -> None:
    tok = make_tokenizer()
    good = write_llama_gguf(make_model(tok), tok, tmp_path / "good.gguf")
    bad = tmp_path / "bad.gguf"
    data = good.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "magic": b"XXXX" + data[4:], "empty": b""}[damage])
    with pytest.raises(UsageError, match="bad.gguf"):
        load_model(str(bad))


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    d = save_tiny(tmp_path / "pkl", safe=False)
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(UsageError, match="pickle"):
        load_model(str(d))
    assert load_model(str(d), allow_pickle=True).model is not None


def _make_adapter(base_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    lm = load_model(str(base_dir))
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_adapter_on_its_base_changes_outputs(tmp_path: Path, tiny_llama_dir: Path) -> None:
    adapter = _make_adapter(tiny_llama_dir, tmp_path / "adapter")
    ref = ModelRef.parse(str(adapter))
    assert ref.adapter == str(adapter.resolve())
    assert ref.base == str(tiny_llama_dir.resolve())
    tuned = load_model(ref)
    base = load_model(str(tiny_llama_dir))
    assert not torch.allclose(_logits(tuned.model, tuned.tokenizer), _logits(base.model, base.tokenizer))


def test_adapter_for_another_base_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    adapter = _make_adapter(tiny_llama_dir, tmp_path / "adapter")
    other = save_tiny(tmp_path / "other", hidden=32)
    with pytest.raises(UsageError, match="another base"):
        load_model(str(adapter), base=str(other))


def test_adapter_with_pickle_weights_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    adapter = _make_adapter(tiny_llama_dir, tmp_path / "adapter")
    import safetensors.torch

    state = safetensors.torch.load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin")
    with pytest.raises(UsageError, match="pickle"):
        load_model(str(adapter))


def test_model_specs() -> None:
    assert ModelRef.parse("smollm2-135m").kind == "alias"
    assert ModelRef.parse("openai:gpt-4o-mini").is_endpoint
    ref = ModelRef.parse("openai:my-model@http://127.0.0.1:8000/v1")
    assert (ref.base, ref.api_base) == ("my-model", "http://127.0.0.1:8000/v1")
    hub = ModelRef.parse("HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert (hub.kind, hub.base, hub.revision) == ("hf", "HuggingFaceTB/SmolLM2-135M-Instruct", "main")
    with pytest.raises(UsageError, match="unknown model 'nosuchmodel'"):
        ModelRef.parse("nosuchmodel")
    with pytest.raises(UsageError, match="not found"):
        ModelRef.parse("./missing/dir")
    with pytest.raises(UsageError, match="GGUF file not found"):
        ModelRef.parse("missing.gguf")


def test_hub_id_offline_without_cache_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UsageError, match="cannot load model"):
        load_model("tunesec-test/does-not-exist")


def test_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a model directory"):
        load_model(str(tmp_path / "empty"))


def test_chat_template_is_sandboxed_and_has_a_fallback(tiny_llama_dir: Path) -> None:
    lm = load_model(str(tiny_llama_dir))
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        ChatFormatter(lm.tokenizer, template=evil).render([{"role": "user", "content": "x"}])
    lm.tokenizer.chat_template = None
    fmt = ChatFormatter(lm.tokenizer)
    assert fmt.uses_fallback and fmt.template == FALLBACK_TEMPLATE
    assert fmt.render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_cached_conversion_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunesec.models.aliases import CONVERTED_MARKER, convert_gguf_to_safetensors

    tok = make_tokenizer()
    gguf_path = write_llama_gguf(make_model(tok), tok, tmp_path / "m.gguf")
    out = convert_gguf_to_safetensors(gguf_path, tmp_path / "cache" / "m")
    assert (out / "model.safetensors").is_file() and (out / CONVERTED_MARKER).is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    gguf_path.unlink()  # a second call must not need the source again
    assert convert_gguf_to_safetensors(gguf_path, tmp_path / "cache" / "m") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    shutil.rmtree(out)


def test_fingerprint_changes_when_a_weight_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    from tunesec.models.fingerprint import fingerprint

    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    d = save_tiny(tmp_path / "m")
    ref = ModelRef.parse(str(d))
    first = fingerprint(ref)["weights_sha256"]
    assert fingerprint(ref)["weights_sha256"] == first  # cached, same answer
    state = load_file(str(d / "model.safetensors"))
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1.0
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert fingerprint(ref)["weights_sha256"] != first


def test_weight_hashes_are_what_sha256sum_prints(tiny_llama_dir: Path) -> None:
    """Every recorded file hash is the plain sha256 of the file; the digest is the sha256 of the sha256sum listing."""
    import hashlib
    import shutil
    import subprocess

    from tunesec.models.fingerprint import weight_hashes

    hashes = weight_hashes(tiny_llama_dir)
    assert hashes is not None and hashes["files"]
    for name, digest in hashes["files"].items():
        assert digest == hashlib.sha256((tiny_llama_dir / name).read_bytes()).hexdigest()
    if shutil.which("sha256sum"):
        names = sorted(hashes["files"], key=str.encode)
        listing = subprocess.run(["sha256sum", *names], cwd=tiny_llama_dir, capture_output=True, check=True).stdout
        assert hashlib.sha256(listing).hexdigest() == hashes["sha256"]


def test_adapter_in_a_run_directory_is_named_after_the_run() -> None:
    from tunesec.models.ref import ModelRef

    ref = ModelRef(base="smollm2-135m", kind="alias", adapter="runs/2026-harmful-sft/model")
    assert ref.name == "smollm2-135m+2026-harmful-sft"
    assert ModelRef(base="smollm2-135m", kind="alias", adapter="adapters/my-lora").name == "smollm2-135m+my-lora"
