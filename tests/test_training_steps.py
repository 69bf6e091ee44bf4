"""The engine's step tools (R1-R4): perturbations restore exactly, activation taps, snapshots, hook state on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from test_training_fixtures import chat, make_loaded, memorise_set
from tunesec.training import HookContext, TrainConfig, TrainingHook, train
from tunesec.training.steps import (
    ActivationTap,
    Perturbation,
    StepClock,
    WeightSnapshot,
    add_to_grad,
    example_losses,
    find_modules,
    global_norm,
    gradient,
    layer_index,
    perturbed,
    step_rng,
    token_logprobs,
)


def _batch(loaded: Any, n: int = 4) -> dict:
    from tunesec.training.collate import chat_renderer, collate_packed, encode_dataset, features

    enc = encode_dataset(memorise_set(n), loaded.tokenizer, chat_renderer(loaded.tokenizer), 64)
    return collate_packed(features(enc))


def _loss(model: Any, batch: dict) -> Any:
    from tunesec.training.trainer import lm_loss_mean

    return lm_loss_mean(model, batch)


def test_perturbed_restores_weights_bit_for_bit() -> None:
    import torch

    loaded = make_loaded()
    params = list(loaded.model.parameters())
    before = [p.detach().clone() for p in params]
    direction = [torch.randn_like(p) for p in params]
    with perturbed(params, direction, 0.37):
        moved = params[0].detach().clone()
        assert torch.allclose(moved, before[0] + 0.37 * direction[0])
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    move = Perturbation(params, direction, -1e3)
    assert not torch.equal(params[0], before[0])
    move.restore()
    move.restore()  # idempotent
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_gradient_norm_and_add_to_grad_match_autograd() -> None:
    import torch

    loaded = make_loaded()
    model, batch = loaded.model, _batch(loaded)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = gradient(_loss(model, batch), params)
    assert all(p.grad is None for p in params)  # .grad untouched
    _loss(model, batch).backward()
    for g, p in zip(grads, params, strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)
    expected = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert float(global_norm(grads)) == pytest.approx(float(expected), rel=1e-5)
    add_to_grad(params, grads, weight=2.0)
    for g, p in zip(grads, params, strict=True):
        assert torch.allclose(p.grad, 3 * g, atol=1e-6)


def test_activation_tap_records_gradients_and_adds_to_outputs() -> None:
    import torch

    loaded = make_loaded()
    model, batch = loaded.model, _batch(loaded)
    tap = ActivationTap(model, "attention")
    assert [layer_index(n) for n in tap.names] == [0, 1]
    assert [n for n, _ in find_modules(model, "mlp")] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with tap.recording():
        loss = _loss(model, batch)
    outputs = {n: t.detach().clone() for n, t in tap.outputs.items()}
    grads = tap.output_gradients(loss)
    assert set(grads) == set(tap.names) and all(g.shape == outputs[n].shape for n, g in grads.items())
    # the same gradients captured during a normal backward pass
    with tap.capturing_gradients() as captured:
        _loss(model, batch).backward()
    for n in tap.names:
        assert torch.allclose(captured[n], grads[n], atol=1e-6)
    # adding: the outputs seen by the next forward pass are shifted by exactly delta (first layer: same input)
    delta = {tap.names[0]: torch.full_like(outputs[tap.names[0]], 0.5)}
    with tap.adding(delta), tap.recording([tap.names[0]]):
        _loss(model, batch)
    # the recorded output is the module's own (the hook order: adding first, then recording sees the sum)
    shifted = tap.outputs[tap.names[0]].detach()
    assert torch.allclose(shifted, outputs[tap.names[0]] + 0.5, atol=1e-5)
    with torch.no_grad():  # hooks removed after the blocks
        assert torch.allclose(_loss(model, batch), loss, atol=1e-6)


def test_weight_snapshot_swaps_in_and_back_and_reference_logprobs() -> None:
    import torch

    loaded = make_loaded()
    model, batch = loaded.model, _batch(loaded)
    named = [(n, p) for n, p in model.named_parameters()]
    snap = WeightSnapshot(named)
    with torch.no_grad():
        ref_lp = token_logprobs(model, batch)
        for _, p in named:
            p.add_(0.05)
        live_lp = token_logprobs(model, batch)
        with snap.swapped_in():
            assert torch.allclose(token_logprobs(model, batch), ref_lp, atol=1e-6)
        assert torch.allclose(token_logprobs(model, batch), live_lp, atol=1e-6)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    assert ref_lp.shape == (n_labels,) and bool((ref_lp <= 0).all())
    expected = sum(float(((p.detach() - v) ** 2).sum()) for p, v in zip(snap.params, snap.values, strict=True))
    assert float(snap.sq_distance().detach()) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_token_logprobs_mean_is_the_engine_loss() -> None:
    import torch

    loaded = make_loaded()
    batch = _batch(loaded)
    with torch.no_grad():
        assert float(-token_logprobs(loaded.model, batch).mean()) == pytest.approx(
            float(_loss(loaded.model, batch)), rel=1e-5
        )


def test_example_losses_match_per_example_batches() -> None:
    import torch

    loaded = make_loaded()
    examples = memorise_set(5)
    losses = example_losses(loaded.model, loaded.tokenizer, examples, max_seq_len=64, batch_size=2)
    from tunesec.training.collate import chat_renderer, collate_packed, encode_dataset, features

    for ex in examples:
        enc = encode_dataset([ex], loaded.tokenizer, chat_renderer(loaded.tokenizer), 64)
        with torch.no_grad():
            alone = float(_loss(loaded.model, collate_packed(features(enc))))
        assert losses[ex.id] == pytest.approx(alone, rel=1e-4)


def test_step_clock_and_step_rng() -> None:
    clock = StepClock(step=4, max_steps=8, micro=0, accumulation=2)
    assert clock.progress == 0.5 and clock.every(2) and not clock.every(3)
    clock.micro = 1
    assert not clock.every(2)
    a = step_rng(7, StepClock(step=3), "x").random()
    assert a == step_rng(7, StepClock(step=3), "x").random() != step_rng(7, StepClock(step=4), "x").random()


class _Recorder(TrainingHook):
    """Records the clock; keeps a counter in its state; draws from an extra stream each micro-batch."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []
        self.counter = 0
        self.drawn: list[list[int]] = []

    def setup(self, ctx: HookContext) -> None:
        self.ctx = ctx
        self.stream = ctx.batches("align", batch_size=1)

    def before_step(self, model: Any, inputs: dict) -> None:
        c = self.ctx.clock
        self.seen.append((c.step, c.micro, c.max_steps))
        self.counter += 1
        self.drawn.append(next(self.stream)["input_ids"][0].tolist())

    def state_dict(self) -> dict:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter = state["counter"]


class _Kill(TrainingHook):
    def __init__(self, at_call: int) -> None:
        self.calls, self.at_call = 0, at_call

    def before_step(self, model: Any, inputs: dict) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt("killed")


def test_clock_hook_state_and_stream_positions_survive_resume(tmp_path: Path) -> None:
    cfg = TrainConfig(
        max_steps=4, save_steps=2, per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2
    )
    align = {
        "align": [chat(100 + i, "what is the color of the sky", f"{w}") for i, w in enumerate(("blue", "red", "green"))]
    }
    straight = _Recorder()
    train(
        make_loaded(),
        memorise_set(8),
        cfg,
        out_dir=tmp_path / "a",
        hooks=[straight],
        extra_datasets=align,
        progress=False,
    )
    assert [s[:2] for s in straight.seen] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert {s[2] for s in straight.seen} == {4}
    with pytest.raises(KeyboardInterrupt):
        train(
            make_loaded(),
            memorise_set(8),
            cfg,
            out_dir=tmp_path / "b",
            hooks=[_Recorder(), _Kill(6)],
            extra_datasets=align,
            progress=False,
        )
    resumed = _Recorder()
    train(
        make_loaded(),
        memorise_set(8),
        cfg,
        out_dir=tmp_path / "b",
        hooks=[resumed],
        extra_datasets=align,
        resume=True,
        progress=False,
    )
    assert resumed.seen[0][:2] == (2, 0)
    assert resumed.counter == straight.counter  # 4 before the checkpoint (restored) + 4 after
    assert resumed.drawn == straight.drawn[4:]  # the stream continued where the checkpoint left it


class _Swap(TrainingHook):
    """Trains on a fixed batch instead of the loader's."""

    name = "swap"

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def substitute_batch(self, inputs: dict) -> dict:
        return self.batch


def test_substitute_batch_trains_on_the_hooks_batch(tmp_path: Path) -> None:
    import torch

    loaded = make_loaded()
    only = _batch(loaded, 2)
    cfg = TrainConfig(max_steps=3, per_device_batch_size=4, learning_rate=1e-2, save_steps=0)
    a = train(make_loaded(), memorise_set(8), cfg, out_dir=tmp_path / "a", hooks=[_Swap(only)], progress=False)
    b = train(
        make_loaded(),
        memorise_set(2),
        TrainConfig(**{**cfg.model_dump(), "per_device_batch_size": 2}),
        out_dir=tmp_path / "b",
        progress=False,
    )
    pa = dict(a.model.named_parameters())
    for n, p in b.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(pa[n], p, atol=1e-5), n
