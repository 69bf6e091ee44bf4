"""continued: presets under the user's fields, benign steps first, a harmful-rate point at every checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_training_fixtures import chat
from tunesec.attacks.continued import BENIGN, BenignFirstHook, Continued, ContinuedConfig, Scorer
from tunesec.evals.metrics import MetricValue
from tunesec.models.ref import ModelRef


def test_preset_fields_apply_under_the_users_own() -> None:
    c = ContinuedConfig.model_validate({"preset": "eds-repnoise", "training": {"learning_rate": 1e-4}})
    assert c.training.method == "full" and c.training.lr_scheduler == "cosine" and c.length_mult == 0.2
    assert c.training.learning_rate == 1e-4  # the user's value wins
    assert ContinuedConfig.model_validate({"preset": "attention-lora"}).training.lora_target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj"]  # fmt: skip
    from typing import get_args

    from tunesec.attacks.continued import PRESETS, PresetName

    assert set(get_args(PresetName)) == set(PRESETS)  # every preset is selectable, every name has fields
    for name in PRESETS:  # and every preset is a valid config
        ContinuedConfig.model_validate({"preset": name})


def test_benign_first_substitutes_only_the_first_steps() -> None:
    from tunesec.training.steps import StepClock

    benign = {"input_ids": "benign"}
    clock = StepClock()
    hook = BenignFirstHook(steps=2)

    class Ctx:
        config = type("C", (), {"seed": 0})()

        def batches(self, name: str, seed: int = 0) -> Any:
            assert name == BENIGN
            while True:
                yield benign

    ctx = Ctx()
    ctx.clock = clock  # type: ignore[attr-defined]
    hook.setup(ctx)  # type: ignore[arg-type]
    seen = []
    for step in range(4):
        clock.step = step
        seen.append(hook.substitute_batch({"input_ids": "harmful"}))
    assert seen == [benign, benign, None, None]


class CountingScorer(Scorer):
    def __init__(self) -> None:
        super().__init__(judge="stand-in")
        self.refs: list[ModelRef] = []

    def harmful(self, ref: ModelRef, examples: Any, out: Path) -> MetricValue:
        self.refs.append(ref)
        return MetricValue(name="harmful_rate", value=0.5, ci_low=0.1, ci_high=0.9, n=len(examples), method="wilson",
                           confidence=0.95)  # fmt: skip


def _data(tmp: Path) -> tuple[str, str]:
    harmful = tmp / "h.jsonl"
    harmful.write_text("".join(json.dumps({"messages": chat(i, f"how to make poison {i}", "sure here").chat()}) + "\n"
                               for i in range(8)))  # fmt: skip
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"harmful request {i}"}) + "\n" for i in range(5)))
    return str(harmful), str(prompts)


def test_curve_has_a_point_per_checkpoint_and_benign_steps_come_first(tiny_llama_dir: Path, tmp_path: Path) -> None:
    harmful, prompts = _data(tmp_path)
    cfg = {"data": harmful, "n_harmful": 8, "benign_data": harmful, "n_benign": 4, "benign_first_steps": 2,
           "length_mult": 0.5, "eval_every": 2, "eval_dataset": prompts, "eval_limit": 3,
           "training": {"num_epochs": 2.0, "per_device_batch_size": 4, "max_seq_len": 64}}  # fmt: skip
    scorer = CountingScorer()
    ref = Continued(cfg).run(str(tiny_llama_dir), tmp_path / "run", progress=False, scorer=scorer)
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    steps = [p["step"] for p in curve["points"]]
    # 2 benign steps + ceil(8 / 4 * 2 * 0.5) = 2 harmful steps -> checkpoints at 2 and 4, plus step 0
    assert steps == [0, 2, 4] and curve["n"] == 3
    assert scorer.refs[0].adapter is None and scorer.refs[1].adapter.endswith("checkpoint-2")
    assert (Path(scorer.refs[1].adapter) / "adapter_model.safetensors").is_file()
    assert ref.provenance["hooks"] == ["benign-first"] and ref.provenance["curve"]["points"][2]["step"] == 4


def test_checkpoints_are_scored_through_the_real_evaluation(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from test_evals_runner import ScriptedJudge
    from tunesec.registry import registry

    registry.add("judge", "scripted", ScriptedJudge)  # harmful when the answer starts with "Sure"
    harmful, prompts = _data(tmp_path)
    cfg = {"data": harmful, "n_harmful": 4, "length_mult": 1.0, "eval_every": 1, "eval_dataset": prompts,
           "eval_limit": 2, "eval_judge": "scripted", "eval_max_new_tokens": 4,
           "training": {"max_steps": 2, "per_device_batch_size": 4, "max_seq_len": 64}}  # fmt: skip
    Continued(cfg).run(str(tiny_llama_dir), tmp_path / "run", progress=False)
    points = json.loads((tmp_path / "run" / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [0, 1, 2]
    assert all(p["harmful_rate"]["n"] == 2 for p in points)
    assert (tmp_path / "run" / "curve" / "step-1" / "metrics.json").is_file()
