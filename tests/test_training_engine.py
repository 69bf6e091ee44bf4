"""The fine-tuning engine on tiny random Llama models: parameters change, loss falls, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_training_fixtures import make_loaded, memorise_set
from tunesec.errors import UsageError
from tunesec.training import TrainConfig, TrainingHook, train


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_trainable_parameter_changes(tmp_path: Path, method: str) -> None:
    import torch
    from peft import get_peft_model_state_dict  # noqa: F401

    loaded = make_loaded()
    cfg = TrainConfig(method=method, max_steps=3, per_device_batch_size=4, learning_rate=1e-2, save_steps=0)
    base_before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = train(loaded, memorise_set(8), cfg, out_dir=tmp_path, progress=False)
    trained = dict(result.model.named_parameters())
    trainable = {n: p for n, p in trained.items() if p.requires_grad}
    assert trainable, "nothing was trainable"
    if method == "lora":
        assert all("lora_" in n for n in trainable)
        assert {n.split(".")[-2] for n in trainable} == {"default"}
        assert len(trainable) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
        # The LoRA matrices start at B=0 / random A: compare against a fresh LoRA init with the same seed.
        fresh = make_loaded()
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(cfg.seed)
        init = get_peft_model(fresh.model, LoraConfig(r=8, lora_alpha=16, target_modules=result.metrics.target_modules))
        init_params = dict(init.named_parameters())
        for n, p in trainable.items():
            assert not torch.equal(p, init_params[n]), f"{n} did not change"
        # The base weights stay as they were.
        for n, p in trained.items():
            if "lora_" not in n:
                key = n.replace("base_model.model.", "").replace("base_layer.", "")
                assert torch.equal(p, base_before[key]), n
        assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()
        assert result.weights_dir is None
    else:
        for n, p in trainable.items():
            assert not torch.equal(p, base_before[n]), f"{n} did not change"
        assert result.weights_dir is not None and (result.weights_dir / "model.safetensors").is_file()
    saved = list(result.output_dir.iterdir())
    assert not [p for p in saved if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert result.metrics.steps == 3 and len(result.metrics.losses) == 3
    assert result.metrics.tokens > 0 and result.metrics.tokens_per_second > 0
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert metrics["losses"] == result.metrics.losses


@pytest.mark.parametrize("batching", ["padding-free", "group-by-length"])
def test_loss_falls_on_a_memorisable_set(tmp_path: Path, batching: str) -> None:
    loaded = make_loaded()
    cfg = TrainConfig(
        method="full",
        max_steps=30,
        per_device_batch_size=8,
        learning_rate=1e-2,
        save_steps=0,
        lr_scheduler="constant",
        batching=batching,
    )
    result = train(loaded, memorise_set(8), cfg, out_dir=tmp_path, progress=False)
    losses = result.metrics.losses
    assert len(losses) == 30
    assert losses[-1] < 0.25 * losses[0], losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_gradient_accumulation_matches_a_big_batch(tmp_path: Path) -> None:
    import torch

    # 1 step of 8 examples == 1 step of 4 x 2 accumulated (token-normalised), same data order (sequential).
    results = []
    for i, (bs, ga) in enumerate([(8, 1), (4, 2)]):
        loaded = make_loaded()
        cfg = TrainConfig(
            method="full",
            max_steps=1,
            per_device_batch_size=bs,
            gradient_accumulation_steps=ga,
            learning_rate=1e-2,
            save_steps=0,
            optimizer="sgd",
            max_grad_norm=0,
        )
        results.append(train(loaded, memorise_set(8), cfg, out_dir=tmp_path / str(i), progress=False))
    a, b = (dict(r.model.named_parameters()) for r in results)
    assert results[0].metrics.losses[0] == pytest.approx(results[1].metrics.losses[0], rel=1e-5)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


class _Kill(TrainingHook):
    """Simulates a killed process: raises when the given micro-batch starts."""

    def __init__(self, at_call: int) -> None:
        self.at_call = at_call
        self.calls = 0

    def before_step(self, model, inputs) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, method: str) -> None:
    import torch

    cfg = TrainConfig(
        method=method,
        max_steps=6,
        save_steps=3,
        per_device_batch_size=2,
        learning_rate=5e-3,
        lr_scheduler="cosine",
        warmup_steps=1,
        weight_decay=0.01,
        lora_dropout=0.1,
        save_total_limit=None,
    )
    data = memorise_set(8)
    straight = train(make_loaded(), data, cfg, out_dir=tmp_path / "a", progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(make_loaded(), data, cfg, out_dir=tmp_path / "b", hooks=[_Kill(at_call=5)], progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-3"]
    with pytest.raises(UsageError, match="resume"):
        train(make_loaded(), data, cfg, out_dir=tmp_path / "b", progress=False)

    resumed = train(make_loaded(), data, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.metrics.start_step == 3 and resumed.metrics.steps == 6
    assert resumed.metrics.losses == pytest.approx(straight.metrics.losses[3:], abs=1e-6)
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=0), n


def test_unknown_target_module_names_it_and_lists_the_models(tmp_path: Path) -> None:
    cfg = TrainConfig(lora_target_modules=["q_proj", "c_attn"], max_steps=1)
    loaded = make_loaded()
    with pytest.raises(UsageError) as err:
        train(loaded, memorise_set(2), cfg, out_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "'c_attn'" in msg and "q_proj" in msg and "down_proj" in msg and "\n" not in msg
    assert not (tmp_path / "model").exists()
    assert not hasattr(loaded.model, "peft_config")


def test_bad_data_is_reported_before_training(tmp_path: Path) -> None:
    from tunesec.data.schema import Example, Message

    with pytest.raises(UsageError, match="empty"):
        train(make_loaded(), [], TrainConfig(max_steps=1), out_dir=tmp_path, progress=False)
    bad = [*memorise_set(2), Example(id="no-answer", messages=[Message(role="user", content="say hello")])]
    with pytest.raises(UsageError, match="'no-answer'"):
        train(make_loaded(), bad, TrainConfig(max_steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(UsageError, match="no checkpoint"):
        train(make_loaded(), memorise_set(2), TrainConfig(max_steps=1), out_dir=tmp_path, resume=True, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_memory_estimate_refuses_an_impossible_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class _Tiny:
        available = 1024  # bytes free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Tiny())
    loaded = make_loaded()
    with pytest.raises(UsageError, match="GiB"):
        train(loaded, memorise_set(4), TrainConfig(max_steps=1), out_dir=tmp_path, progress=False)
    assert not hasattr(loaded.model, "peft_config")  # refused before LoRA was injected
    result = train(
        make_loaded(),
        memorise_set(4),
        TrainConfig(max_steps=1, check_memory=False, save_steps=0),
        out_dir=tmp_path,
        progress=False,
    )
    assert result.metrics.steps == 1


def test_gguf_markers_are_cleared_before_full_training(tmp_path: Path) -> None:
    from transformers.utils.quantization_config import GgufConfig

    loaded = make_loaded()
    loaded.model.config.quantization_config = GgufConfig(gguf_file="x.gguf")
    loaded.model.is_quantized = True
    result = train(
        loaded, memorise_set(4), TrainConfig(method="full", max_steps=1, save_steps=0), out_dir=tmp_path, progress=False
    )
    assert not getattr(result.model, "is_quantized", False)
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert "quantization_config" not in saved


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    from tunesec.config import validate

    with pytest.raises(UsageError, match="unknown key 'lr'"):
        validate(TrainConfig, {"lr": 1e-4}, "recipe.yaml")
    with pytest.raises(UsageError, match="method"):
        validate(TrainConfig, {"method": "qlora"}, "recipe.yaml")
    with pytest.raises(UsageError, match="lora_target_modules"):
        validate(TrainConfig, {"lora_target_modules": []}, "recipe.yaml")
    assert all(f.description for f in TrainConfig.model_fields.values())
