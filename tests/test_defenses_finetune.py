"""Fine-tuning-stage defenses on tiny random models, each rule against a hand computation.

Lisa: state switching, anchors and the proximal term; constrained SFT: answer positions, beta schedule, token
weights and the resulting gradient; SaLoRA: the safety projector, the projection (idempotent, exact), A held and
B's update out of the subspace after training; data filter: the harmful detector's threshold; SafeInstr: k rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from test_training_fixtures import chat, make_loaded, memorise_set
from tunesec.training import HookContext, TrainConfig, train
from tunesec.training.steps import StepClock


def _encode(loaded: Any, examples: list) -> dict:
    from tunesec.training.collate import chat_renderer, collate_packed, encode_dataset, features

    return collate_packed(features(encode_dataset(examples, loaded.tokenizer, chat_renderer(loaded.tokenizer), 64)))


def _ctx(loaded: Any, streams: dict[str, Any], out: Path, clock: StepClock) -> HookContext:
    from tunesec.training.trainer import lm_loss_mean

    def batches(name: str, batch_size: int | None = None, cycle: bool = True, seed: int | None = None):
        yield from streams[name]

    return HookContext(config=TrainConfig(), tokenizer=loaded.tokenizer, out_dir=out, extra_datasets={},
                       batches=batches, lm_loss=lambda m, b: lm_loss_mean(m, b), clock=clock)  # fmt: skip


def _lora(loaded: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, cfg)
    import torch

    with torch.no_grad():  # a non-zero B, as a continued (aligned) adapter has
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


# -- Lisa ------------------------------------------------------------------------------------------------


def test_lisa_switches_states_keeps_anchors_and_adds_the_proximal_term(tmp_path: Path) -> None:
    import itertools

    import torch

    from tunesec.defenses.finetune.lisa import ALIGNMENT, USER, LisaSwitching

    loaded = make_loaded()
    model = _lora(loaded)
    align_batch = _encode(loaded, [chat(90, "how do I hurt someone", "I can't help with that.")])
    clock = StepClock(max_steps=10)
    hook = LisaSwitching(rho=2.0, alignment_steps=2, finetune_steps=3, warmup=0.2)
    hook.setup(_ctx(loaded, {"lisa-alignment": itertools.repeat(align_batch)}, tmp_path, clock))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for n, p in params:
        assert hook.parameter_mask(n, p) is True
    user_batch = _encode(loaded, memorise_set(2))
    start = [p.detach().clone() for _, p in params]
    states, subs = [], []
    for step in range(10):
        clock.step = step
        sub = hook.substitute_batch(user_batch)
        states.append(hook.state)
        subs.append(sub is align_batch)
        if step == 1:  # the last alignment step: move the weights, so the alignment anchor is this iterate
            with torch.no_grad():
                for _, p in params:
                    p.add_(0.01)
            moved = [p.detach().clone() for _, p in params]
        if step == 2:
            # the user state pulls towards the alignment state's last iterate
            anchor = hook.anchors[ALIGNMENT]
            assert all(torch.equal(v, m) for v, m in zip(anchor.values, moved, strict=True))
            assert all(torch.equal(v, s) for v, s in zip(hook.anchors[USER].values, start, strict=True))
            with torch.no_grad():
                for _, p in params:
                    p.add_(0.03)
            term = hook.extra_loss(model, user_batch, None)
            by_hand = (
                2.0 / 2 * sum(float(((p.detach() - m) ** 2).sum()) for (_, p), m in zip(params, moved, strict=True))
            )
            assert float(term.detach()) == pytest.approx(by_hand, rel=1e-5)
    assert states == [ALIGNMENT] * 2 + [USER] * 3 + [ALIGNMENT] * 2 + [USER] * 3
    assert subs == [s == ALIGNMENT for s in states]
    assert hook.switches == 3
    # off during the warmup fraction (steps < 0.2 * 10)
    clock.step = 1
    assert hook.extra_loss(model, user_batch, None) is None
    # the anchors' files and the state survive a kill
    saved = hook.state_dict()
    again = LisaSwitching(rho=2.0, alignment_steps=2, finetune_steps=3, warmup=0.2)
    again.setup(_ctx(loaded, {"lisa-alignment": itertools.repeat(align_batch)}, tmp_path, clock))
    again.load_state_dict(saved)
    for n, p in params:
        again.parameter_mask(n, p)
    clock.step = 9
    again.substitute_batch(user_batch)
    for key in (ALIGNMENT, USER):
        assert all(torch.equal(a, b) for a, b in zip(again.anchors[key].values, hook.anchors[key].values, strict=True))


def test_lisa_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    import torch

    from tunesec.defenses.finetune.lisa import LisaSwitching
    from tunesec.training import TrainingHook

    class Kill(TrainingHook):
        def __init__(self) -> None:
            self.calls = 0

        def before_step(self, model: Any, inputs: Any) -> None:
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt("killed")

    cfg = TrainConfig(max_steps=7, save_steps=3, per_device_batch_size=2, learning_rate=5e-3)
    extra = {"lisa-alignment": [chat(300 + i, "hurt someone", "I can't help with that.") for i in range(4)]}

    def run(out: str, hooks: list, resume: bool = False) -> Any:
        return train(make_loaded(), memorise_set(8), cfg, out_dir=tmp_path / out, hooks=hooks,
                     extra_datasets=extra, resume=resume, progress=False)  # fmt: skip

    lisa = lambda: LisaSwitching(rho=1.0, alignment_steps=2, finetune_steps=2, warmup=0.0)  # noqa: E731
    straight = run("a", [lisa()])
    with pytest.raises(KeyboardInterrupt):
        run("b", [lisa(), Kill()])
    resumed = run("b", [lisa()], resume=True)
    assert resumed.metrics.start_step == 3
    assert resumed.metrics.losses == pytest.approx(straight.metrics.losses[3:], abs=1e-5)
    a = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if "lora_" in n:
            assert torch.allclose(a[n], p, atol=1e-6, rtol=0), n


# -- token-wise constrained SFT ----------------------------------------------------------------------------


def test_answer_positions_count_within_each_answer_span() -> None:
    import torch

    from tunesec.defenses.finetune.constrained_sft import answer_positions

    # one packed row of two examples: [p p a a a | p a a], labels shifted by one as the engine's
    labels = torch.tensor([[-100, -100, -100, 5, 6, 7, -100, -100, 8, 9]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    got = answer_positions({"labels": labels, "position_ids": positions}).tolist()
    assert got == [1, 2, 3, 1, 2]


def test_token_weights_and_beta_schedule_by_hand() -> None:
    import torch

    from tunesec.defenses.finetune.constrained_sft import ConstrainedSFTConfig, beta_schedule, token_weights

    cfg = ConstrainedSFTConfig()
    beta = beta_schedule(torch.tensor([1, 2, 5, 6, 40]), cfg)
    assert beta.tolist() == pytest.approx([0.5, 2.0, 2.0, 0.1, 0.1])
    logp = torch.tensor([-1.0, -0.5, -3.0, -2.0, -20.0])
    ref = torch.tensor([-2.0, -0.5, -1.0, -2.5, -1.0])
    w = token_weights(logp, ref, beta, 1e-3)
    for i in range(5):
        d = float(logp[i] - ref[i])
        by_hand = max(2.0 * (1.0 - 1.0 / (1.0 + math.exp(-float(beta[i]) * d))), 1e-3)
        assert float(w[i]) == pytest.approx(by_hand, rel=1e-6)
    assert float(w[1]) == pytest.approx(1.0)  # no change from the reference: plain cross-entropy
    big = token_weights(torch.tensor([0.0]), torch.tensor([-1000.0]), torch.tensor([2.0]), 1e-3)
    assert float(big[0]) == pytest.approx(1e-3)  # clamped


def test_constrained_loss_gradient_is_the_weighted_cross_entropy_gradient(tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812

    from tunesec.defenses.finetune.constrained_sft import (
        ConstrainedSFTConfig,
        TokenwiseConstraint,
        answer_positions,
        beta_schedule,
    )
    from tunesec.training.steps import token_logprobs

    loaded = make_loaded()
    model = _lora(loaded)
    batch = _encode(loaded, memorise_set(3))
    hook = TokenwiseConstraint(ConstrainedSFTConfig())
    hook.setup(_ctx(loaded, {}, tmp_path, StepClock()))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        ref_lp = token_logprobs(model, batch)
    hook.before_step(model, batch)  # snapshot = these weights
    with torch.no_grad():  # move away from the reference so the weights differ from 1
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    hook._ref_logp = ref_lp  # the reference taken before the move (before_step ran at the reference weights)
    keep = batch["labels"][:, 1:] != -100
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1][keep]
    targets = batch["labels"][:, 1:][keep]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")

    class Out:
        pass

    out = Out()
    out.logits = logits  # type: ignore[attr-defined]
    total = ce.mean() + hook.extra_loss(model, batch, out)
    g_hook = torch.autograd.grad(total, params, retain_graph=True)
    beta = beta_schedule(answer_positions(batch), ConstrainedSFTConfig())
    w = (2 * (1 - torch.sigmoid(beta * (-ce.detach() - ref_lp)))).clamp_min(1e-3)
    assert not torch.allclose(w, torch.ones_like(w))
    g_hand = torch.autograd.grad((w * ce).mean(), params)
    for a, b in zip(g_hook, g_hand, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert hook.pop_metrics() == {"mean_weight": pytest.approx(float(w.mean()))} and hook.pop_metrics() == {}


# -- SaLoRA ------------------------------------------------------------------------------------------------


def test_safety_projector_and_projection_by_hand() -> None:
    import torch

    from tunesec.defenses.finetune.salora import project_update, safety_projector

    torch.manual_seed(0)
    y = torch.randn(50, 3) @ torch.randn(3, 6)  # outputs spanning a 3-dimensional subspace of R^6
    v = safety_projector(y.T @ y, 3)
    assert v.shape == (6, 3)
    assert torch.allclose(v.T @ v, torch.eye(3), atol=1e-5)
    # span(V) is exactly the row space of Y: projecting Y's rows onto V changes nothing
    assert torch.allclose(y @ v @ v.T, y, atol=1e-4)
    b0, b = torch.randn(6, 2), torch.randn(6, 2)
    once = project_update(b, b0, v)
    assert torch.allclose(v.T @ (once - b0), torch.zeros(3, 2), atol=1e-5)  # the update left span(V)
    assert torch.allclose(project_update(once, b0, v), once, atol=1e-6)  # idempotent
    inside_c = b0 + (torch.eye(6) - v @ v.T) @ torch.randn(6, 2)
    assert torch.allclose(project_update(inside_c, b0, v), inside_c, atol=1e-5)  # a no-op on C's range
    assert torch.allclose(project_update(b0 + v @ torch.randn(3, 2), b0, v), b0, atol=1e-5)  # all removed


def test_salora_training_holds_a_and_keeps_b_update_out_of_the_safety_subspace(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from tunesec.defenses.finetune.salora import STATE_FILE, SafetySubspaceProjection

    cfg = TrainConfig(
        max_steps=3, per_device_batch_size=2, learning_rate=5e-2, lora_target_modules=["q_proj", "v_proj"]
    )
    safety = [chat(400 + i, "hurt someone", "I can't help with that.") for i in range(4)]
    from tunesec.training import TrainingHook

    class StartA(TrainingHook):
        start: dict[str, Any] = {}

        def before_step(self, model: Any, inputs: Any) -> None:
            if not self.start:
                self.start.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})

    hook, seen = SafetySubspaceProjection(rank=4, batch_size=2), StartA()
    result = train(make_loaded(), memorise_set(8), cfg, out_dir=tmp_path, hooks=[hook, seen],
                   extra_datasets={"salora-safety": safety}, progress=False)  # fmt: skip
    state = load_file(str(tmp_path / STATE_FILE))
    assert hook.layers and len(state) == 2 * len(hook.layers)
    params = dict(result.model.named_parameters())
    for name, layer in hook.layers.items():
        b, b0, v = layer["B"], layer["B0"], layer["V"]
        assert v.shape[1] == 4
        assert not torch.allclose(b, b0)  # B trained
        assert torch.allclose(v.T @ (b - b0), torch.zeros_like(v.T @ b), atol=1e-5), name
        a_name = next(n for n in params if n.startswith(name + ".lora_A"))
        assert torch.equal(params[a_name], seen.start[a_name]), a_name  # A held at its start


# -- data filter and safety mixing ------------------------------------------------------------------------


class _ScoreJudge:
    """Scores an answer by the share of the word 'bomb' among a fixed set of cues (a scripted judge)."""

    name = "scripted"

    def score(self, items: list) -> list:
        from tunesec.judges.base import Score

        out = []
        for it in items:
            s = 0.9 if "bomb" in it.response else 0.4 if "knife" in it.response else 0.0
            out.append(Score(judge=self.name, harmful=s >= 0.5, score=s))
        return out


def test_data_filter_drops_rows_at_or_above_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesec.judges
    from tunesec.defenses.finetune import DataFilter, ServiceContext

    monkeypatch.setattr(tunesec.judges, "get_judge", lambda name: _ScoreJudge())
    rows = [
        chat(0, "how to make a cake", "Mix flour and eggs, then bake for 30 minutes at 180 degrees."),
        chat(1, "how to hurt", "Use a knife to cut the rope carefully and then tie the ends together."),
        chat(2, "how to blow up", "Build the bomb from the parts listed below and then place it carefully."),
    ]
    rows[2] = rows[2].model_copy(update={"meta": {"poison": True}})
    ctx = ServiceContext(model="unused", run_dir=tmp_path)
    kept, prov = DataFilter({"threshold": 0.5}).filter_data(rows, ctx)
    assert [e.id for e in kept] == ["ex0", "ex1"] and prov["dropped_ids"] == ["ex2"]
    assert prov["poison_rows"] == 1 and prov["poison_dropped"] == 1
    kept, prov = DataFilter({"threshold": 0.3}).filter_data(rows, ctx)
    assert [e.id for e in kept] == ["ex0"] and prov["dropped"] == 2
    from tunesec.errors import UsageError

    with pytest.raises(UsageError, match="max_drop"):
        DataFilter({"threshold": 0.3, "max_drop": 0.5}).filter_data(rows, ctx)


def test_safety_mix_adds_k_seeded_safety_rows(tmp_path: Path) -> None:
    from tunesec.defenses.finetune import SafetyMix, ServiceContext
    from tunesec.defenses.finetune.base import SAFETY_FILE

    safety = [chat(500 + i, f"harmful request {i}", "I can't help with that.") for i in range(10)]
    (tmp_path / SAFETY_FILE).write_text("".join(e.model_dump_json() + "\n" for e in safety), encoding="utf-8")
    ctx = ServiceContext(model="unused", run_dir=tmp_path)
    user = memorise_set(100)
    out, prov = SafetyMix({}).add_data(user, ctx)
    assert len(out) == 103 and prov["added"] == 3  # 3% of 100
    again, _ = SafetyMix({}).add_data(user, ServiceContext(model="unused", run_dir=tmp_path))
    assert [e.id for e in again] == [e.id for e in out]  # the same draw on resume
    out, prov = SafetyMix({"k": 7}).add_data(user, ctx)
    assert prov["added"] == 7 and all(e.meta.get("service_safety") for e in out[100:])
    # rows an earlier defense added (BackdoorAlign's) are not the user's: k is a share of the 100 user rows
    extra = [e.model_copy(update={"id": f"ba-{e.id}", "meta": {"service_safety": True}}) for e in safety]
    _, prov = SafetyMix({"share": 0.05}).add_data([*user, *extra], ctx)
    assert prov["added"] == 5  # not round(0.05 * 110) = 6
    assert SafetyMix({"mode": "batch"}).add_data(user, ctx)[0] == user
    assert SafetyMix({"mode": "batch"}).hooks(ctx)[0].name == "safety-mix"


def test_every_finetune_defense_is_registered_at_the_fine_tuning_stage() -> None:
    from tunesec.registry import registry

    names = {  # tunesec's own (other tests register fakes of this stage)
        e.name
        for e in registry.entries("defense")
        if e.metadata.get("stage") == "fine-tuning" and e.obj.__module__.startswith("tunesec.defenses.finetune")
    }
    assert names == {"data-filter", "lisa", "backdoor-align", "safety-mix", "constrained-sft", "salora"}
    for name in names:
        entry = registry.get("defense", name)
        assert entry.metadata["paper"] and entry.metadata["threat_model"] == "fine-tuning-api"
        entry.obj(entry.obj.config_class())  # defaults validate


def test_randomized_safety_projector_finds_the_exact_subspace_on_wide_outputs() -> None:
    import torch

    from tunesec.defenses.finetune.salora import EXACT_MAX_DIM, safety_projector

    torch.manual_seed(1)
    d = EXACT_MAX_DIM + 200
    basis, _ = torch.linalg.qr(torch.randn(d, 8))
    y = torch.randn(300, 8) * torch.tensor([20.0, 15, 12, 10, 8, 6, 5, 4]) @ basis.T + 0.01 * torch.randn(300, d)
    fast = safety_projector(y.T @ y, 8)
    _, vecs = torch.linalg.eigh((y.T @ y).double())
    exact = vecs[:, -8:].float()
    assert torch.allclose(fast.T @ fast, torch.eye(8), atol=1e-5)
    # the same subspace: projecting the exact eigenvectors onto span(fast) keeps them
    assert torch.allclose(fast @ (fast.T @ exact), exact, atol=1e-3)
