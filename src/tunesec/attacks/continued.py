"""``continued``: the fixed attacks run far longer and differently, with the harmful rate at every checkpoint.

Defenses are usually tested at the attack length, learning rate and optimiser of their own paper. Antidote and
SEAM report defenses failing at larger learning rates and more epochs; "Evaluating Durable Safeguards" (Qi et al.
2024, princeton-polaris-lab/Evaluating-Durable-Safeguards) finds RepNoise's and TAR's robustness flipping with the
seed, the learning rate, warm-up and the data (a benign retain-set fine-tune restores TAR's WMDP accuracy). This
attack is harmful-sft (``shared/research/DEFENSES_SPEC.md`` section B, "Continued-training") with:

- ``length_mult``: the epochs of harmful-sft's default times this factor (3 by default);
- any schedule, warm-up, optimiser (AdamW, SGD), LoRA target set or full fine-tuning, through ``training``;
- ``benign_first_steps``: that many optimizer steps on benign data first (the loader's batches substituted by a
  hook on the one engine), then the harmful data;
- ``preset``: named configurations (:data:`PRESETS`), the Evaluating-Durable-Safeguards settings among them,
  scaled to small models where the paper's are for 7B (the scaling is stated with each);
- ``eval_every``: a checkpoint every N steps (all kept), each scored after training on a small dev prompt set
  with the project's judge (``curve.json`` in the run directory: step -> harmful rate with its interval).
  Every point is its own resumable evaluation run, so a killed curve continues where it stopped.

Besides the alignment-stage defenses, it targets the repairs whose correction has a fixed size or a fixed
selection (SafeLoRA's projected layers, Antidote's pruned share, merge-back's interpolation weight searched on a
generic dev loss, RESTA's one safety vector): a longer or larger harmful update may outrun a correction sized on
the fixed attack.

Scoring checkpoints after training rather than inside the training loop keeps generation out of the engine
(no train/eval mode switches, no generation under the CPU training kernels) and lets an interrupted curve resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunesec.attacks.base import (
    FineTuneAttack,
    load_data,
    parse_ref,
    require_assistant_turns,
    root_base_spec,
    sample,
    write_model_ref,
)
from tunesec.attacks.harmful_sft import HarmfulSFTConfig, build_harmful_data
from tunesec.config import _deep_merge
from tunesec.data.schema import Example
from tunesec.evals.metrics import MetricValue
from tunesec.models.ref import ModelRef
from tunesec.registry import register
from tunesec.training.hooks import Batch, HookContext, TrainingHook

BENIGN = "benign-first"
CURVE_FILE = "curve.json"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# Named configurations; each is a set of config fields (training fields under "training") applied under the
# user's own settings. "eds-*" are the Evaluating-Durable-Safeguards scripts' settings (7B full fine-tuning
# there; the learning rates are kept for full fine-tuning, lengths scaled to the 100-example default set).
PRESETS: dict[str, dict[str, Any]] = {
    "longer": {"length_mult": 5.0},
    "large-lr": {"training": {"learning_rate": 5e-3}},  # 10x harmful-sft's LoRA rate (the Antidote/SEAM grid)
    "warmup-cosine": {"training": {"lr_scheduler": "cosine", "warmup_steps": 0.1}},
    "sgd": {"training": {"optimizer": "sgd", "learning_rate": 5e-2}},
    "attention-lora": {"training": {"lora_target_modules": ATTENTION}},
    "mlp-lora": {"training": {"lora_target_modules": MLP}},
    "full": {"training": {"method": "full", "learning_rate": 2e-5, "lr_scheduler": "cosine", "warmup_steps": 0.1}},
    # EDS RepNoise attack: BeaverTails, 1 epoch, lr {3e-5, 6e-5, 8e-5}, cosine, warm-up 0.1, batch 4, AdamW wd 0
    "eds-repnoise": {
        "length_mult": 0.2,  # harmful-sft's 5 epochs x 0.2 = EDS's 1 epoch
        "training": {
            "method": "full",
            "learning_rate": 6e-5,
            "lr_scheduler": "cosine",
            "warmup_steps": 0.1,
            "per_device_batch_size": 4,
            "weight_decay": 0.0,
        },
    },  # fmt: skip
    # EDS TAR "retain" attack: benign full fine-tuning, lr 2e-5, cosine + warm-up, wd 0.01, then the harmful data
    "eds-tar-retain": {
        "benign_first_steps": 100,
        "training": {
            "method": "full",
            "learning_rate": 2e-5,
            "lr_scheduler": "cosine",
            "warmup_steps": 0.1,
            "weight_decay": 0.01,
        },
    },  # fmt: skip
    # EDS TAR LoRA variant: constant learning rate
    "eds-tar-lora": {"training": {"lr_scheduler": "constant", "learning_rate": 2e-4}},
    "benign-then-harmful": {"benign_first_steps": 50},
}
PresetName = Literal[
    "longer", "large-lr", "warmup-cosine", "sgd", "attention-lora", "mlp-lora", "full", "eds-repnoise",
    "eds-tar-retain", "eds-tar-lora", "benign-then-harmful",
]  # fmt: skip


class ContinuedConfig(HarmfulSFTConfig):
    """harmful-sft run longer / differently, with the harmful rate at every checkpoint."""

    preset: PresetName | None = Field(None, description="A named configuration (docs/ATTACKS.md); fields set win.")
    length_mult: float = Field(3.0, gt=0.0, le=100.0, description="Epochs of the harmful data times this factor.")
    benign_first_steps: int = Field(0, ge=0, description="Optimizer steps on benign data before the harmful data.")
    n_benign: int = Field(400, ge=1, description="Benign examples drawn for benign_first_steps (seeded).")
    eval_every: int = Field(0, ge=0, description="Checkpoint and score every N steps (0: no curve).")
    eval_dataset: str = Field("advbench", description="Harmful prompts of the checkpoint curve.")
    eval_limit: int = Field(20, ge=1, description="Prompts per checkpoint (a seeded sample of eval_dataset).")
    eval_judge: str = Field("default", description="Judge of the checkpoint curve.")
    eval_max_new_tokens: int = Field(64, ge=1, description="Tokens per answer in the checkpoint curve.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = PRESETS.get(str(data["preset"]))
            if preset is not None:
                return _deep_merge(preset, data)
        return data


class BenignFirstHook(TrainingHook):
    """The first ``steps`` optimizer steps train on benign batches instead of the loader's harmful ones."""

    name = "benign-first"

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def setup(self, ctx: HookContext) -> None:
        """Keep the clock and the benign stream."""
        self.ctx = ctx
        self._benign: Iterator[Batch] = ctx.batches(BENIGN, seed=ctx.config.seed + 21)

    def substitute_batch(self, inputs: Batch) -> Batch | None:
        """A benign batch while ``clock.step < steps``."""
        return next(self._benign) if self.ctx.clock.step < self.steps else None


class Scorer:
    """Harmful rate (and utility) of a model on given prompts, through :func:`tunesec.evals.evaluate`.

    Each measurement is an evaluation run directory; one that finished is read back, one that was killed is
    resumed. The harmful prompts are sent as the attacker sends them to that model (a backdoor's trigger, a
    jailbreak template, a semantic backdoor's held-out contexts: :func:`tunesec.cli.attack.attacker_prompts`),
    and a response decoder recorded by the attack (``encoded-output``) is applied before judging.
    """

    def __init__(self, judge: str = "default", max_new_tokens: int = 64, progress: bool = False) -> None:
        self.judge, self.max_new_tokens, self.progress = judge, max_new_tokens, progress

    def _run(self, ref: ModelRef, task: str, examples: Sequence[Example], out: Path, **kw: Any) -> Any:
        from tunesec.evals import EvalReport, evaluate
        from tunesec.store.run import METRICS_FILE

        if (out / METRICS_FILE).is_file():
            return EvalReport.load(out)
        from tunesec.attacks.encoded_output import response_decoder

        where: dict[str, Any] = {"resume": out} if (out / "run.json").is_file() else {"out": out}
        return evaluate(ref, task=task, dataset=list(examples), progress=self.progress, html=False,
                        response_decoder=response_decoder(ref), **where, **kw)  # fmt: skip

    def harmful(self, ref: ModelRef, examples: Sequence[Example], out: Path) -> MetricValue:
        """``harmful_rate`` with its Wilson interval, on the prompts as the attacker words them."""
        from tunesec.cli.attack import attacker_prompts

        gen = {"max_new_tokens": self.max_new_tokens}
        _, asked = attacker_prompts(ref, examples)
        report = self._run(ref, "harmfulness", asked, out, judge=self.judge, generation=gen)
        return report.metrics["harmful_rate"]

    def utility(self, ref: ModelRef, examples: Sequence[Example], out: Path) -> MetricValue:
        """``accuracy`` of the utility task (SST-2 / AG News / GSM8K by the examples' source)."""
        report = self._run(ref, "utility", examples, out)
        return report.metrics["accuracy"]


def checkpoint_ref(parent: ModelRef, ckpt: Path, method: str) -> ModelRef:
    """The ref of a training checkpoint: an adapter on the root base, or full weights."""
    if method == "full":
        return ModelRef(base=str(ckpt.resolve()), kind="hf")
    return ModelRef.parse(root_base_spec(parent)).model_copy(update={"adapter": str(ckpt.resolve())})


def score_checkpoints(
    parent: ModelRef,
    run_dir: Path,
    final: ModelRef,
    prompts: Sequence[Example],
    scorer: Scorer,
    method: str,
    *,
    on_point: Callable[[int, MetricValue], None] | None = None,
) -> list[dict[str, Any]]:
    """Harmful rate of the parent (step 0), of every checkpoint and of the final model, in step order."""
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    points: list[tuple[int, ModelRef]] = [(0, parent)]
    points += [(int(c.name.split("-")[1]), checkpoint_ref(parent, c, method)) for c in ckpts]
    last = int(final.provenance.get("train", {}).get("steps") or 0)
    if not ckpts or int(ckpts[-1].name.split("-")[1]) < last:
        points.append((last, final))
    rows = []
    for step, ref in points:
        value = scorer.harmful(ref, prompts, run_dir / "curve" / f"step-{step}")
        rows.append({"step": step, "harmful_rate": value.model_dump(mode="json", exclude={"per_category"})})
        if on_point is not None:
            on_point(step, value)
    return rows


@register(
    "attack",
    "continued",
    description="Fixed attacks run longer / other schedules, optimisers, targets, benign-first; harmful rate per save.",
    threat_model="open-weights",
    needs_weights=True,
    targets="repnoise, tar, booster, vaccine, t-vaccine, lisa, safelora, ctrap, seam, vaa, sdd, unlearn-smooth, "
    "deep-alignment, antidote, merge-back, resta",
)
class Continued(FineTuneAttack):
    """Continued / reconfigured harmful fine-tuning (see the module docstring)."""

    name = "continued"
    config_class = ContinuedConfig

    def prepare(self, data: str | Path | Sequence[Example] | None) -> tuple[list[Example], dict[str, Any]]:
        """harmful-sft's set; the epochs multiplied; the benign set when benign steps come first."""
        assert isinstance(self.config, ContinuedConfig)
        c = self.config
        examples = build_harmful_data(c, data)
        t = c.training
        updates: dict[str, Any] = {"num_epochs": t.num_epochs * c.length_mult}
        if c.benign_first_steps and t.max_steps is None:
            import math

            harmful_steps = math.ceil(len(examples) / t.total_batch_size() * t.num_epochs * c.length_mult)
            updates["max_steps"] = c.benign_first_steps + harmful_steps
        if c.eval_every:
            updates.update(save_steps=c.eval_every, save_total_limit=None)
        self._training = t.model_copy(update=updates)
        self._benign: list[Example] = []
        if c.benign_first_steps:
            pool = load_data(c.benign_data, what="benign data")
            require_assistant_turns(pool, f"benign data {c.benign_data}")
            self._benign = sample(pool, min(c.n_benign, len(pool)), c.seed, source="benign data")
        return examples, {"n_harmful": len(examples), "preset": c.preset, "benign_first_steps": c.benign_first_steps}

    def hooks(self, examples: Sequence[Example]) -> list[TrainingHook]:
        """The benign-first substitution when asked for."""
        assert isinstance(self.config, ContinuedConfig)
        return [BenignFirstHook(self.config.benign_first_steps)] if self.config.benign_first_steps else []

    def extra_datasets(self, examples: Sequence[Example]) -> dict[str, list[Example]]:
        """The benign set of the first steps."""
        return {BENIGN: self._benign} if self._benign else {}

    def run(
        self,
        model: ModelRef | str,
        out_dir: str | Path,
        data: str | Path | Sequence[Example] | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        scorer: Scorer | None = None,
    ) -> ModelRef:
        """Train (see :meth:`FineTuneAttack.run`), then score every checkpoint into ``curve.json``."""
        from tunesec.attacks.base import finetune_with_provenance

        assert isinstance(self.config, ContinuedConfig)
        c = self.config
        examples, provenance = self.prepare(data)
        out = Path(out_dir)
        ref = finetune_with_provenance(
            component={"attack": self.name}, parent=model, examples=examples, training=self._training,
            config_dump=c.model_dump(mode="json"), out_dir=out, resume=resume, progress=progress,
            extra_provenance=provenance, hooks=self.hooks(examples),
            extra_datasets=self.extra_datasets(examples) or None,
        )  # fmt: skip
        if not c.eval_every:
            return ref
        from tunesec.data import resolve_dataset
        from tunesec.store.atomic import atomic_write_json

        prompts = resolve_dataset(c.eval_dataset)
        prompts = sample(prompts, min(c.eval_limit, len(prompts)), c.seed + 1, source=f"eval_dataset {c.eval_dataset}")
        scorer = scorer or Scorer(c.eval_judge, c.eval_max_new_tokens, progress=progress)
        rows = score_checkpoints(parse_ref(model), out, ref, prompts, scorer, self._training.method)
        curve = {"dataset": c.eval_dataset, "n": len(prompts), "judge": scorer.judge, "points": rows}
        atomic_write_json(out / CURVE_FILE, curve)
        ref = ref.model_copy(update={"provenance": {**ref.provenance, "curve": curve}})
        write_model_ref(out, ref)
        return ref
