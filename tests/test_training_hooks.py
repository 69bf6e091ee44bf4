"""Each kind of training hook takes effect, and hooks compose."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_training_fixtures import chat, make_loaded, memorise_set
from tunesec.errors import UsageError
from tunesec.training import ExtraBatch, HookContext, TrainConfig, TrainingHook, train

CFG = dict(max_steps=4, per_device_batch_size=4, learning_rate=1e-2, save_steps=0)
TARGET = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def _run(tmp_path: Path, name: str, hooks=(), **overrides):
    cfg = TrainConfig(**{**CFG, **overrides})
    extra = {"align": [chat(100 + i, "what is the color of the sky", "no") for i in range(6)]}
    return train(
        make_loaded(), memorise_set(8), cfg, out_dir=tmp_path / name, hooks=hooks, extra_datasets=extra, progress=False
    )


def _params(result) -> dict:
    return {n: p.detach().clone() for n, p in result.model.named_parameters()}


def _differs(a: dict, b: dict) -> bool:
    import torch

    return any(not torch.allclose(a[n], b[n], atol=1e-7) for n in a)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    return _params(_run(tmp_path_factory.mktemp("base"), "base"))


class ZeroProjection(TrainingHook):
    def project(self, model) -> None:
        dict(model.named_parameters())[TARGET].zero_()


def test_projection_keeps_a_parameter_zero(tmp_path: Path, baseline: dict) -> None:
    import torch

    params = _params(_run(tmp_path, "proj", hooks=[ZeroProjection()]))
    assert torch.count_nonzero(params[TARGET]) == 0
    assert torch.count_nonzero(baseline[TARGET]) > 0  # without the hook it moves
    other = TARGET.replace("q_proj", "v_proj")
    assert torch.count_nonzero(params[other]) > 0


class HugePull(TrainingHook):
    """A huge L2 pull of every LoRA weight towards zero."""

    def __init__(self, weight: float = 1e4) -> None:
        self.weight = weight
        self.calls = 0

    def extra_loss(self, model, inputs, outputs):
        self.calls += 1
        return self.weight * sum((p**2).sum() for n, p in model.named_parameters() if p.requires_grad)


def test_extra_loss_changes_the_trajectory(tmp_path: Path, baseline: dict) -> None:
    hook = HugePull()
    params = _params(_run(tmp_path, "pull", hooks=[hook], optimizer="sgd", learning_rate=1e-5, max_grad_norm=0))
    sgd_base = _params(_run(tmp_path, "sgd", optimizer="sgd", learning_rate=1e-5, max_grad_norm=0))
    assert hook.calls == 4
    lora = [n for n in params if "lora_A" in n]
    # SGD with the pull shrinks lora_A (the LM loss alone barely moves it at this learning rate).
    shrink = sum(float(params[n].norm()) for n in lora)
    plain = sum(float(sgd_base[n].norm()) for n in lora)
    assert shrink < 0.9 * plain


def test_extra_losses_of_several_hooks_add_up(tmp_path: Path) -> None:
    import torch

    two = _params(_run(tmp_path, "two", hooks=[HugePull(0.5), HugePull(0.25)]))
    one = _params(_run(tmp_path, "one", hooks=[HugePull(0.75)]))
    for n in two:
        assert torch.allclose(two[n], one[n], atol=1e-5), n


class FreezeLayer0(TrainingHook):
    def parameter_mask(self, name, param):
        return "layers.0." not in name


class HalfMask(TrainingHook):
    """Masks the first half of every lora_B row's entries."""

    def parameter_mask(self, name, param):
        import torch

        if "lora_B" not in name:
            return True
        mask = torch.ones_like(param)
        mask[: param.shape[0] // 2] = 0
        return mask


def test_parameter_mask_freezes_and_masks(tmp_path: Path) -> None:
    import torch

    frozen = _run(tmp_path, "freeze", hooks=[FreezeLayer0()])
    for n, p in frozen.model.named_parameters():
        if "lora_B" in n and "layers.0." in n:
            assert not p.requires_grad and torch.count_nonzero(p) == 0, n  # lora_B starts at 0
        if "lora_B" in n and "layers.1." in n:
            assert torch.count_nonzero(p) > 0, n
    masked = _run(tmp_path, "mask", hooks=[HalfMask()], weight_decay=0.1)
    for n, p in masked.model.named_parameters():
        if "lora_B" in n:
            half = p.shape[0] // 2
            assert torch.count_nonzero(p[:half]) == 0, n  # held at 0 against the update and weight decay
            assert torch.count_nonzero(p[half:]) > 0, n


class Mix(TrainingHook):
    """Lisa-style mixing: one batch of the alignment set per micro-batch until it runs out."""

    def __init__(self, weight: float, cycle: bool = False, skip_every: int = 0) -> None:
        self.weight = weight
        self.cycle = cycle
        self.skip_every = skip_every
        self.consumed = 0

    def setup(self, ctx: HookContext) -> None:
        self.ctx = ctx
        assert len(ctx.extra_datasets["align"]) == 6

    def extra_batches(self):
        for i, batch in enumerate(self.ctx.batches("align", batch_size=2, cycle=self.cycle)):
            if self.skip_every and i % self.skip_every == 0:
                yield None
                continue
            self.consumed += 1
            yield ExtraBatch(batch, weight=self.weight)


def test_extra_batches_are_consumed_and_trained_on(tmp_path: Path, baseline: dict) -> None:
    finite = Mix(weight=1.0)
    mixed = _params(_run(tmp_path, "mix", hooks=[finite], max_steps=5))
    assert finite.consumed == 3  # 6 examples / batch 2, then the iterator is exhausted
    cycling = Mix(weight=1.0, cycle=True)
    _run(tmp_path, "cyc", hooks=[cycling], max_steps=5)
    assert cycling.consumed == 5
    zero = _params(_run(tmp_path, "zero", hooks=[Mix(weight=0.0)]))
    assert not _differs(zero, baseline)  # weight 0: exactly the plain run
    four = _params(_run(tmp_path, "four", hooks=[Mix(weight=1.0)]))
    assert _differs(four, baseline)
    assert mixed  # the 5-step run finished


def test_extra_batches_of_an_unknown_dataset_are_a_usage_error(tmp_path: Path) -> None:
    class Wrong(TrainingHook):
        def setup(self, ctx: HookContext) -> None:
            next(ctx.batches("nope"))

    with pytest.raises(UsageError, match="'nope'.*align"):
        _run(tmp_path, "wrong", hooks=[Wrong()])


class Recorder(TrainingHook):
    needs_hidden_states = True

    def __init__(self) -> None:
        self.events: list[str] = []
        self.hidden = False
        self.grads_in_after = True

    def before_step(self, model, inputs) -> None:
        self.events.append("before")

    def extra_loss(self, model, inputs, outputs):
        self.hidden = outputs.hidden_states is not None and len(outputs.hidden_states) == 3
        assert outputs.logits.dim() == 2  # only the assistant-predicting positions
        n = int((inputs["labels"][..., 1:] != -100).sum())
        assert outputs.logits.shape[0] == n
        return None

    def after_step(self, model) -> None:
        self.events.append("after")
        self.grads_in_after &= any(p.grad is not None for p in model.parameters() if p.requires_grad)

    def project(self, model) -> None:
        self.events.append("project")

    def teardown(self, model) -> None:
        self.events.append("teardown")


class WeightNoise(TrainingHook):
    """Booster/Vaccine-style: perturb weights for the gradient computation, restore them afterwards."""

    def before_step(self, model, inputs) -> None:
        import torch

        self.saved = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "embed_tokens" in n:
                    self.saved[n] = p.detach().clone()
                    p.add_(0.5)

    def after_step(self, model) -> None:
        import torch

        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.saved:
                    p.copy_(self.saved[n])


def test_step_hooks_run_in_order_around_each_micro_batch(tmp_path: Path, baseline: dict) -> None:
    rec = Recorder()
    _run(tmp_path, "rec", hooks=[rec], max_steps=2, per_device_batch_size=2, gradient_accumulation_steps=2)
    assert rec.events == ["before", "after", "before", "after", "project"] * 2 + ["teardown"]
    assert rec.hidden and rec.grads_in_after
    perturbed = _params(_run(tmp_path, "noise", hooks=[WeightNoise()]))
    base_emb = [n for n in baseline if "embed_tokens" in n]
    assert not _differs({n: perturbed[n] for n in base_emb}, {n: baseline[n] for n in base_emb})  # restored
    assert _differs(perturbed, baseline)  # but the gradients were taken at the perturbed point


def test_the_documented_example_hook_runs(tmp_path: Path, baseline: dict) -> None:
    import re

    doc = Path(__file__).resolve().parents[1] / "docs" / "HOOKS.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    source = next(b for b in blocks if "class AlignmentMixing" in b)
    namespace: dict = {}
    exec(compile(source, str(doc), "exec"), namespace)  # noqa: S102
    hook = namespace["AlignmentMixing"](weight=0.5)
    params = _params(_run(tmp_path, "doc", hooks=[hook]))
    assert _differs(params, baseline)


class Measuring(TrainingHook):
    """Measures the micro-batch's count (1, 2, 3, ...) every micro-batch, and 'odd' only on odd steps."""

    name = "measure"

    def __init__(self) -> None:
        self.n = 0
        self.last: dict[str, float] = {}

    def setup(self, ctx: HookContext) -> None:
        self.ctx = ctx

    def after_step(self, model) -> None:
        self.n += 1
        self.last["count"] = float(self.n)
        if self.ctx.clock.step % 2 == 1:
            self.last["odd"] = float(self.ctx.clock.step)

    def pop_metrics(self) -> dict[str, float]:
        out, self.last = self.last, {}
        return out


def test_hook_metrics_are_averaged_per_step_and_per_log(tmp_path: Path) -> None:
    import json

    result = _run(
        tmp_path, "m", hooks=[Measuring()], max_steps=4, per_device_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=2, save_steps=2,
    )  # fmt: skip
    m = result.metrics.hook_metrics
    # micro-batches 1-2 are step 1's, 3-4 step 2's, ...: the step means are 1.5, 3.5, 5.5, 7.5
    assert m["measure/count"] == [1.5, 3.5, 5.5, 7.5]
    # clock.step is the step about to be taken (0-based): measured on the 2nd and 4th steps only
    assert m["measure/odd"] == [None, 1.0, None, 3.0]
    saved = json.loads((tmp_path / "m" / "train_metrics.json").read_text())
    assert saved["hook_metrics"] == m
    state = json.loads(next((tmp_path / "m").rglob("checkpoint-4/trainer_state.json")).read_text())
    logs = [r for r in state["log_history"] if "loss" in r]
    assert [r["measure/count"] for r in logs] == [2.5, 6.5]  # the mean over each 2-step logging interval
    assert [r["measure/odd"] for r in logs] == [1.0, 3.0]
