"""Adaptive attacks (sidestep, kick-settle) on tiny models: the gradient surgery and the kick, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from test_defenses_alignment import _ctx, _encode, _grad, _params, harmful_set
from test_training_fixtures import chat, make_loaded, memorise_set
from tunesec.training import TrainConfig, train
from tunesec.training.steps import StepClock


def test_pcgrad_removes_only_a_conflicting_component() -> None:
    import torch

    from tunesec.attacks.adaptive import pcgrad

    g_h, g_u = [torch.tensor([1.0, -2.0])], [torch.tensor([0.0, 1.0])]
    out, dot = pcgrad(g_h, g_u)
    assert dot == -2.0 and torch.allclose(out[0], torch.tensor([1.0, 0.0]))
    same, dot = pcgrad([torch.tensor([1.0, 2.0])], g_u)
    assert dot == 2.0 and torch.equal(same[0], torch.tensor([1.0, 2.0]))


def test_top_directions_are_orthonormal_and_span_the_leading_gradients() -> None:
    import torch

    from tunesec.attacks.adaptive import top_directions

    torch.manual_seed(0)
    main = torch.randn(10)
    grads = [[(3.0 * (i + 1)) * main[:6].clone(), (3.0 * (i + 1)) * main[6:].clone()] for i in range(4)]
    grads += [[0.01 * torch.randn(6), 0.01 * torch.randn(4)] for _ in range(4)]
    basis = top_directions(grads, 2)
    flat = [torch.cat([t.flatten() for t in d]) for d in basis]
    assert len(flat) == 2
    assert abs(float(flat[0] @ flat[1])) < 1e-5 and float(flat[0].norm()) == pytest.approx(1.0, rel=1e-5)
    cos = float(torch.nn.functional.cosine_similarity(flat[0], main, dim=0))
    assert abs(cos) > 0.999  # the dominant direction is the shared one


def test_sidestep_hook_rewrites_the_gradient_by_hand() -> None:
    import torch

    from tunesec.attacks.adaptive import ANCHOR, SidestepHook, pcgrad

    loaded = make_loaded()
    model = loaded.model
    harm, anchor = _encode(loaded, harmful_set(3)), _encode(loaded, memorise_set(4))
    params = _params(model)
    g_h, g_u = _grad(model, harm), _grad(model, anchor)
    expected_h, _ = pcgrad(g_h, g_u)
    for p, g in zip(params, g_h, strict=True):
        p.grad = g.clone()
    hook = SidestepHook(mu=0.5, use_pcgrad=True, top_k=0, direction_batches=1)
    hook.setup(_ctx(loaded, {ANCHOR: anchor}, StepClock(accumulation=1)))
    hook.after_step(model)
    for p, a, b in zip(params, expected_h, g_u, strict=True):
        assert torch.allclose(p.grad, a + 0.5 * b, atol=1e-6)


def test_kick_settle_scales_the_learning_rate_for_the_kick_only(tmp_path: Path, monkeypatch) -> None:
    import tunesec.training.trainer as trainer_mod
    from tunesec.attacks.adaptive import ANCHOR, KickSettleHook

    seen: list[float] = []
    original = trainer_mod.EngineCallback.on_optimizer_step

    def record(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        seen.append(kwargs["optimizer"].param_groups[0]["lr"])  # the rate the optimizer step just used
        original(self, args, state, control, **kwargs)

    monkeypatch.setattr(trainer_mod.EngineCallback, "on_optimizer_step", record)
    cfg = TrainConfig(max_steps=5, per_device_batch_size=2, learning_rate=1e-3, lr_scheduler="constant", save_steps=0)
    hook = KickSettleHook(kick_steps=2, mult=10.0, mu=1.0)
    train(make_loaded(), memorise_set(8), cfg, out_dir=tmp_path, hooks=[hook], extra_datasets={ANCHOR: memorise_set(4)},
          progress=False)  # fmt: skip
    assert seen == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize(("name", "extra"), [("sidestep", {"top_k": 2, "direction_batches": 3}), ("kick-settle", {})])
def test_adaptive_attacks_run_end_to_end(tiny_llama_dir: Path, tmp_path: Path, name: str, extra: dict) -> None:
    from tunesec.attacks import get_attack

    harmful = tmp_path / "h.jsonl"
    harmful.write_text(
        "".join(
            json.dumps({"messages": chat(i, f"how to make poison {i}", "sure here is how").chat()}) + "\n"
            for i in range(8)
        )
    )
    anchor = tmp_path / "a.jsonl"
    anchor.write_text(
        "".join(json.dumps({"messages": chat(i, f"say hello {i}", "hello world").chat()}) + "\n" for i in range(8))
    )
    config = {"data": str(harmful), "n_harmful": 8, "anchor_data": str(anchor), "n_anchor": 8,
              "training": {"max_steps": 4, "per_device_batch_size": 4, "max_seq_len": 128}, **extra}  # fmt: skip
    ref = get_attack(name, config).run(str(tiny_llama_dir), tmp_path / "run", progress=False)
    assert ref.adapter is not None and (Path(ref.adapter) / "adapter_model.safetensors").is_file()
    prov = json.loads((tmp_path / "run" / "model_ref.json").read_text())["provenance"]
    assert prov["attack"] == name and prov["hooks"] == [name] and prov["n_anchor"] == 8
    if name == "sidestep":
        assert (tmp_path / "run" / "sidestep_directions.safetensors").is_file()
