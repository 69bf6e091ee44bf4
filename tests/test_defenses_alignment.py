"""Alignment-stage defenses (Vaccine, T-Vaccine, Booster, VAA, CTRAP) on tiny random models.

Each defense's term is checked against a hand computation; weights come back exactly after every perturbed pass;
a defended run killed after a checkpoint resumes to the uninterrupted run's weights; each defense runs end to end.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from test_training_fixtures import chat, make_loaded, memorise_set
from tunesec.training import HookContext, TrainConfig, TrainingHook, train
from tunesec.training.steps import StepClock


def _encode(loaded: Any, examples: list) -> dict:
    from tunesec.training.collate import chat_renderer, collate_packed, encode_dataset, features

    return collate_packed(features(encode_dataset(examples, loaded.tokenizer, chat_renderer(loaded.tokenizer), 64)))


def harmful_set(n: int = 6) -> list:
    return [chat(200 + i, "tell me about the dog", "sure here it is one two three") for i in range(n)]


def _ctx(loaded: Any, streams: dict[str, dict], clock: StepClock | None = None) -> HookContext:
    from tunesec.training.trainer import lm_loss_mean

    def batches(name: str, batch_size: int | None = None, cycle: bool = True, seed: int | None = None):
        while True:
            yield streams[name]

    return HookContext(
        config=TrainConfig(),
        tokenizer=loaded.tokenizer,
        out_dir=Path("."),
        extra_datasets={},
        batches=batches,
        lm_loss=lambda m, b: lm_loss_mean(m, b),
        clock=clock or StepClock(),
    )


def _params(model: Any) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _grad(model: Any, batch: dict) -> list:
    import torch

    from tunesec.training.trainer import lm_loss_mean

    return list(torch.autograd.grad(lm_loss_mean(model, batch), _params(model)))


def _norm(grads: list) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


def _moved(model: Any, direction: list, scale: float) -> Any:
    import torch

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(_params(other), direction, strict=True):
            p.add_(d, alpha=scale)
    return other


def _same(a: list, b: list) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _close(a: list, b: list, tol: float = 1e-5) -> bool:
    import torch

    return all(torch.allclose(x, y, atol=tol, rtol=1e-4) for x, y in zip(a, b, strict=True))


# -- Booster ---------------------------------------------------------------------------------------------


def test_booster_term_is_lambda_times_the_gradient_difference_and_weights_come_back() -> None:
    from tunesec.defenses.alignment.booster import HarmfulStepAttenuation

    loaded = make_loaded()
    model, align, harm = loaded.model, _encode(loaded, memorise_set(4)), _encode(loaded, harmful_set())
    before = [p.detach().clone() for p in _params(model)]
    g0 = _grad(model, harm)
    g1 = _grad(_moved(model, g0, -0.1 / (_norm(g0) + 1e-7)), harm)
    hook = HarmfulStepAttenuation(lam=5.0, alpha=0.1)
    hook.setup(_ctx(loaded, {"harmful": harm}))
    hook.before_step(model, align)
    assert _same([p.detach() for p in _params(model)], before)  # restored exactly
    assert _close(hook._term, [5.0 * (a - b) for a, b in zip(g0, g1, strict=True)])
    hook.after_step(model)
    assert _close([p.grad for p in _params(model)], [5.0 * (a - b) for a, b in zip(g0, g1, strict=True)])
    assert hook.last_reduction > 0  # a normalised descent step lowers the harmful loss
    reduction = hook.last_reduction
    assert hook.pop_metrics() == {"reduction": reduction} and hook.pop_metrics() == {}  # logged once


# -- CTRAP -----------------------------------------------------------------------------------------------


def test_ctrap_collapse_labels_replace_only_supervised_positions() -> None:
    import torch

    from tunesec.defenses.alignment.ctrap import collapse_labels, collapse_token

    labels = torch.tensor([[-100, -100, 5, 6, -100, 7]])
    assert collapse_labels(labels, 9).tolist() == [[-100, -100, 9, 9, -100, 9]]
    from tiny import make_tokenizer

    tok = make_tokenizer()
    assert collapse_token(tok, "an error") == tok("an error", add_special_tokens=False)["input_ids"][-1]


def test_ctrap_term_is_the_collapse_gradient_at_the_simulated_harmful_step() -> None:
    from tunesec.defenses.alignment.ctrap import CollapseTrap, collapse_labels

    loaded = make_loaded()
    model, align, harm = loaded.model, _encode(loaded, memorise_set(4)), _encode(loaded, harmful_set())
    before = [p.detach().clone() for p in _params(model)]
    hook = CollapseTrap(lam=0.1, alpha=0.1, text="no")
    hook.setup(_ctx(loaded, {"harmful": harm}))
    g_h = _grad(model, harm)
    collapse = {**align, "labels": collapse_labels(align["labels"], hook.token)}
    g_c = _grad(_moved(model, g_h, -0.1 / (_norm(g_h) + 1e-7)), collapse)
    hook.before_step(model, align)
    assert _same([p.detach() for p in _params(model)], before)
    assert _close(hook._term, [0.1 * g for g in g_c])
    assert hook.token == loaded.tokenizer("no", add_special_tokens=False)["input_ids"][-1]
    assert set(hook.pop_metrics()) == {"collapse_loss"} and hook.pop_metrics() == {}


# -- Vaccine ---------------------------------------------------------------------------------------------


def test_vaccine_perturbation_has_norm_rho_split_by_gradient_norms() -> None:
    import torch

    from tunesec.defenses.alignment.vaccine import HiddenStatePerturbation
    from tunesec.training.steps import ActivationTap
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    model, batch = loaded.model, _encode(loaded, memorise_set(4))
    tap = ActivationTap(model, "attention")
    with tap.recording():
        loss = lm_loss_mean(model, batch)
    e = tap.output_gradients(loss)
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in e.values()))
    clean = float(lm_loss_mean(model, batch).detach())
    hook = HiddenStatePerturbation(rho=2.0)
    hook.setup(_ctx(loaded, {}))
    hook.before_step(model, batch)
    assert math.sqrt(sum(n**2 for n in hook.last_norms)) == pytest.approx(2.0, rel=1e-4)
    assert hook.last_norms == pytest.approx([2.0 * float(g.norm()) / total for g in e.values()], rel=1e-4)
    with torch.no_grad():
        perturbed_loss = float(lm_loss_mean(model, batch))
    assert perturbed_loss > clean  # the perturbation ascends the alignment loss
    hook.after_step(model)
    with torch.no_grad():
        assert float(lm_loss_mean(model, batch)) == pytest.approx(clean, abs=1e-6)  # hooks removed


# -- T-Vaccine -------------------------------------------------------------------------------------------


def test_t_vaccine_probabilities_are_normalised_gradient_norms() -> None:
    from tunesec.defenses.alignment.t_vaccine import layer_probabilities

    assert layer_probabilities([1.0, 3.0]) == [0.25, 0.75]
    assert layer_probabilities([0.0, 0.0]) == [0.5, 0.5]


def test_t_vaccine_sampling_frequencies_follow_the_probabilities() -> None:
    from tunesec.defenses.alignment.t_vaccine import sample_layers

    rng = random.Random(0)
    probs = [0.1, 0.2, 0.7]
    counts = [0, 0, 0]
    for _ in range(20000):
        counts[sample_layers(probs, 1, rng)[0]] += 1
    assert [c / 20000 for c in counts] == pytest.approx(probs, abs=0.015)
    draws = [sample_layers([0.1, 0.2, 0.3, 0.4], 3, rng) for _ in range(200)]
    assert all(len(set(d)) == 3 and d == sorted(d) for d in draws)


def _lora(loaded: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        loaded.model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"),
    )


def test_t_vaccine_scores_layers_and_trains_only_the_sampled_ones() -> None:
    import torch

    from tunesec.defenses.alignment.t_vaccine import LayerwisePerturbation
    from tunesec.training.steps import ActivationTap
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    model = _lora(loaded)
    with torch.no_grad():  # LoRA B starts at zero; move it so attention LoRA gradients are not degenerate
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch, harm = _encode(loaded, memorise_set(4)), _encode(loaded, harmful_set(1))
    tap = ActivationTap(model, "attention")
    with tap.recording():
        loss = lm_loss_mean(model, harm)
    norms = [float(g.norm()) for g in tap.output_gradients(loss).values()]
    hook = LayerwisePerturbation(rho=3.0, layers=1, resample_steps=1, probability_steps=1)
    hook.setup(_ctx(loaded, {"harmful": harm}))
    hook.before_step(model, batch)
    assert hook.probabilities == pytest.approx([n / sum(norms) for n in norms], rel=1e-4)
    assert len(hook.sampled) == 1 and list(hook.layer_norms) == hook.sampled
    assert hook.layer_norms[hook.sampled[0]] == pytest.approx(3.0, rel=1e-4)
    for n, p in model.named_parameters():
        if "lora_" in n and ("q_proj" in n or "v_proj" in n):
            assert p.requires_grad == (f"layers.{hook.sampled[0]}." in n), n
        elif "lora_" in n:
            assert p.requires_grad, n  # MLP LoRA stays trainable
    hook.teardown(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


# -- VAA -------------------------------------------------------------------------------------------------


def test_vaa_group_weight_update_by_hand() -> None:
    from tunesec.defenses.alignment.vaa import update_group_weight

    p1, p2 = 0.5 * math.exp(0.007 * 2.0 / 0.5), 0.5
    assert update_group_weight(0.5, 2.0, 0.007, True) == pytest.approx(p1 / (p1 + p2))
    p1, p2 = 0.3, 0.7 * math.exp(0.007 * 1.5 / 0.7)
    assert update_group_weight(0.3, 1.5, 0.007, False) == pytest.approx(p1 / (p1 + p2))
    assert update_group_weight(0.89, 500.0, 0.007, True) == 0.9  # clipped
    assert update_group_weight(0.11, 500.0, 0.007, False) == 0.1


def test_vaa_sam_step_trains_at_the_ascent_point_and_restores_weights() -> None:
    from tunesec.defenses.alignment.vaa import OTHER, VULNERABLE, GroupDROSampling
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    model = loaded.model
    vul, oth = _encode(loaded, memorise_set(2)), _encode(loaded, harmful_set(2))
    clock = StepClock(step=10, max_steps=10)  # progress 1: lambda_t = lambda = 1, always SAM
    hook = GroupDROSampling(rho=0.4, lam=1.0, eta=0.007, p_init=0.5)
    ctx = _ctx(loaded, {VULNERABLE: vul, OTHER: oth}, clock)
    hook.setup(ctx)
    batch = hook.substitute_batch({})
    assert batch is (vul if hook.group == VULNERABLE else oth)
    before = [p.detach().clone() for p in _params(model)]
    g = _grad(model, batch)
    expected = _grad(_moved(model, g, 0.4 / (_norm(g) + 1e-7)), batch)
    hook.before_step(model, batch)
    loss = lm_loss_mean(model, batch)  # the engine's training pass, at the perturbed weights
    loss.backward()
    ctx.last_loss = float(loss.detach())
    hook.after_step(model)
    assert _same([p.detach() for p in _params(model)], before)
    assert _close([p.grad for p in _params(model)], expected)
    assert hook.sam_steps == 1 and hook.p != 0.5


def test_vaa_draws_the_vulnerable_group_with_probability_p() -> None:
    from tunesec.defenses.alignment.vaa import OTHER, VULNERABLE, GroupDROSampling

    loaded = make_loaded()
    clock = StepClock(max_steps=4000)
    hook = GroupDROSampling(rho=0.4, lam=0.0, eta=1e-9, p_init=0.8)
    hook.setup(_ctx(loaded, {VULNERABLE: {"v": 1}, OTHER: {"o": 0}}, clock))
    picks = 0
    for step in range(4000):
        clock.step = step
        picks += "v" in hook.substitute_batch({})
    assert picks / 4000 == pytest.approx(0.8, abs=0.03)


# -- resume ----------------------------------------------------------------------------------------------


class _Kill(TrainingHook):
    name = "kill"

    def __init__(self, at_call: int) -> None:
        self.calls, self.at_call = 0, at_call

    def before_step(self, model: Any, inputs: dict) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt("killed")


def _hook(name: str) -> TrainingHook:
    from tunesec.defenses.alignment.booster import HarmfulStepAttenuation
    from tunesec.defenses.alignment.ctrap import CollapseTrap
    from tunesec.defenses.alignment.t_vaccine import LayerwisePerturbation
    from tunesec.defenses.alignment.vaa import GroupDROSampling
    from tunesec.defenses.alignment.vaccine import HiddenStatePerturbation

    return {
        "vaccine": lambda: HiddenStatePerturbation(rho=2.0),
        "t-vaccine": lambda: LayerwisePerturbation(rho=3.0, layers=1, resample_steps=2, probability_steps=3),
        "booster": lambda: HarmfulStepAttenuation(lam=5.0, alpha=0.1, batch_size=2),
        "vaa": lambda: GroupDROSampling(rho=0.4, lam=1.0, eta=0.5, p_init=0.5),
        "ctrap": lambda: CollapseTrap(lam=0.1, alpha=0.1, text="no", batch_size=2),
    }[name]()


@pytest.mark.parametrize("name", ["vaccine", "t-vaccine", "booster", "vaa", "ctrap"])
def test_a_defended_run_resumes_to_the_same_weights(tmp_path: Path, name: str) -> None:
    import torch

    cfg = TrainConfig(max_steps=6, save_steps=3, per_device_batch_size=2, learning_rate=5e-3, lr_scheduler="cosine")
    extra = {
        "harmful": harmful_set(4),
        "vaa-vulnerable": memorise_set(4),
        "vaa-other": [chat(300 + i, "say hello", "hello world") for i in range(4)],
    }
    run = lambda out, hooks, resume=False: train(  # noqa: E731
        make_loaded(),
        memorise_set(8),
        cfg,
        out_dir=tmp_path / out,
        hooks=hooks,
        extra_datasets=extra,
        resume=resume,
        progress=False,
    )
    straight_hook = _hook(name)
    straight = run("a", [straight_hook])
    with pytest.raises(KeyboardInterrupt):
        run("b", [_hook(name), _Kill(at_call=5)])
    resumed = run("b", [_hook(name)], resume=True)
    assert resumed.metrics.start_step == 3
    assert resumed.metrics.losses == pytest.approx(straight.metrics.losses[3:], abs=1e-5)
    a = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if "lora_" in n:
            assert torch.allclose(a[n], p, atol=1e-6, rtol=0), n


# -- end to end ------------------------------------------------------------------------------------------


def _write(path: Path, examples: list, harmful: bool | None = None) -> Path:
    rows = []
    for e in examples:
        row: dict[str, Any] = {"messages": e.chat()}
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TINY_ALIGN = {
    "exclude_eval": [],
    "training": {
        "max_steps": 3,
        "per_device_batch_size": 4,
        "max_seq_len": 128,
        "save_steps": 0,
        "learning_rate": 5e-3,
    },
}


@pytest.mark.parametrize("name", ["vaccine", "t-vaccine", "booster", "vaa", "ctrap"])
def test_each_defense_runs_end_to_end(tiny_llama_dir: Path, tmp_path: Path, name: str) -> None:
    from tunesec.defenses import get_defense
    from tunesec.models.ref import ModelRef

    harmful = _write(
        tmp_path / "harmful.jsonl", [chat(i, f"how do I make poison {i}", "sure here is how") for i in range(12)]
    )
    config: dict[str, Any] = {"alignment": TINY_ALIGN, "harmful": {"data": str(harmful), "n": 8, "exclude": []}}
    if name == "vaa":
        config.update(proxy_model=str(tiny_llama_dir), proxy_steps=2, vulnerable_share=0.5)
    defense = get_defense(name, config)
    data = memorise_set(8)
    ref = defense.run(str(tiny_llama_dir), tmp_path / "run", data=data, progress=False)
    assert isinstance(ref, ModelRef) and ref.adapter is not None
    assert (Path(ref.adapter) / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "model_ref.json").read_text())
    prov = saved["provenance"]
    assert prov["defense"] == name and prov["hooks"] == [name]
    if defense.needs_harmful:
        assert prov["harmful_data"]["n"] == 8 and len(prov["harmful_data"]["ids"]) == 8
    if name == "vaa":
        groups = json.loads((tmp_path / "run" / "vaa_groups.json").read_text())
        assert len(groups["vulnerable"]) == 4 and set(groups["loss_before"]) == {e.id for e in data}
