"""The one fine-tuning engine: supervised fine-tuning (LoRA or full) on transformers' ``Trainer`` with hooks.

Attacks (harmful fine-tuning) and training-time defenses (Vaccine, Booster, Lisa, RepNoise, SafeLoRA ...) are
configs plus :class:`~tunesec.training.hooks.TrainingHook` objects handed to :func:`train`; none copies the
trainer. Run directory layout written here::

    out_dir/checkpoints/checkpoint-N/   resumable checkpoints (adapter or weights as safetensors, optimizer state)
    out_dir/model/                      the final adapter (LoRA) or weights (full), safetensors, plus tokenizer
    out_dir/train_metrics.json          losses per step, tokens/s, steps, seconds

Heavy libraries (torch, transformers, peft) are imported inside :func:`train`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.models.cpu_kernels import cpu_training
from tunesec.store.atomic import atomic_write_json
from tunesec.training import distributed
from tunesec.training.collate import (
    chat_renderer,
    collate_packed,
    encode_dataset,
    features,
    make_padded_collator,
)
from tunesec.training.config import TrainConfig
from tunesec.training.hooks import Batch, HookContext, TrainingHook
from tunesec.training.preflight import check_memory, drop_gguf_markers, trainable_count, training_memory

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
METRICS_FILE = "train_metrics.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_LAYER_RE = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")


class LoadedModelLike(Protocol):
    """What :func:`train` needs of a loaded model (``tunesec.models.LoadedModel`` satisfies it)."""

    model: Any
    tokenizer: Any


@dataclass
class TrainMetrics:
    """Measurements of one training call (steps done in this call, after a resume only the new ones).

    ``losses`` holds each optimizer step's language-modelling loss; ``hook_metrics`` each hook measurement
    (:meth:`~tunesec.training.hooks.TrainingHook.pop_metrics`, ``"<hook>/<key>"``) per step, ``None`` where a
    step did not measure it.
    """

    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    steps: int = 0
    examples: int = 0
    dropped_examples: int = 0
    truncated_examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    target_modules: list[str] = field(default_factory=list)
    hook_metrics: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: The trained model (a ``peft.PeftModel`` for LoRA), in eval mode.
        adapter_dir: Directory of the saved LoRA adapter (``None`` for full fine-tuning).
        weights_dir: Directory of the saved full weights (``None`` for LoRA).
        metrics: Losses per step, throughput and timing.
        checkpoint_dir: Where resumable checkpoints were written.
    """

    model: Any
    adapter_dir: Path | None
    weights_dir: Path | None
    metrics: TrainMetrics
    checkpoint_dir: Path

    @property
    def output_dir(self) -> Path:
        """The saved adapter or weights directory."""
        out = self.adapter_dir or self.weights_dir
        assert out is not None
        return out


def train(
    model: LoadedModelLike,
    dataset: Sequence[Example],
    config: TrainConfig,
    *,
    out_dir: str | Path,
    hooks: Sequence[TrainingHook] = (),
    extra_datasets: Mapping[str, Sequence[Example]] | None = None,
    resume: bool | str | Path = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` (loss on assistant tokens only) and save it as safetensors.

    The modules of ``model.model`` are trained in place (LoRA layers are injected into it); load a fresh copy
    to keep the base model. Bad input is reported before any training step.

    Args:
        model: A loaded model with ``.model`` (a causal LM) and ``.tokenizer`` (with a chat template).
        dataset: Training chats; each ends with the assistant turn that is learned.
        config: Hyperparameters.
        out_dir: Run directory; checkpoints go to ``out_dir/checkpoints``, the result to ``out_dir/model``.
        hooks: Training hooks (defenses, adaptive attacks), composed in order.
        extra_datasets: Named second datasets that hooks draw batches from (``HookContext.batches``).
        resume: ``True`` resumes from the last checkpoint in ``out_dir/checkpoints``; a path names one.
        progress: Show a rich progress bar with the loss.

    Returns:
        The trained model, where it was saved, and the metrics.

    Raises:
        UsageError: Empty dataset, an example without a final assistant turn, an unknown LoRA target module,
            an estimated memory need above what is free, checkpoints present without ``resume``.
    """
    out = Path(out_dir)
    hf_model, tokenizer = model.model, model.tokenizer
    render = chat_renderer(tokenizer)
    encoded = encode_dataset(dataset, tokenizer, render, config.max_seq_len, what="dataset")
    extra_rows = {
        name: features(encode_dataset(exs, tokenizer, render, config.max_seq_len, what=f"extra_datasets[{name}]"))
        for name, exs in (extra_datasets or {}).items()
    }
    ckpt_root = out / CHECKPOINTS
    resume_from = _resolve_resume(ckpt_root, resume)
    _check_fsdp(hf_model, config, hooks)
    # A launched command: rank 0 has prepared everything the other ranks read (run directory, data); let them go.
    distributed.release_workers()
    distributed.training_started()
    main = distributed.is_main_process()
    progress = progress and main

    import torch
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunesec.training.trainer import (
        BatchStream,
        EngineCallback,
        HookedTrainer,
        accepts_logits_to_keep,
        build_masks,
        lm_loss_mean,
        load_hook_states,
    )

    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    drop_gguf_markers(hf_model)
    targets = _resolve_targets(hf_model, config)
    n_trainable = trainable_count(hf_model, config, targets)
    if config.check_memory:
        check_memory(hf_model, config, encoded, n_trainable)
    reserve = training_memory(hf_model, config, encoded, n_trainable)  # kept free of the kernels' weight copies
    set_seed(config.seed)
    trainable = _prepare_method(hf_model, config, targets)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = collate_packed if config.batching == "padding-free" else make_padded_collator(int(pad_id))
    use_ltk = accepts_logits_to_keep(trainable)
    device = next(trainable.parameters()).device

    streams: list[BatchStream] = []  # every iterator hooks asked for, in order: their positions are checkpointed
    resumed_counts: list[int] = []  # on resume: how far each stream had got

    def batches(
        name: str, batch_size: int | None = None, cycle: bool = True, seed: int | None = None
    ) -> Iterator[Batch]:
        rows = extra_rows.get(name)
        if rows is None:
            raise UsageError(f"extra_datasets: no dataset named {name!r}; given: {', '.join(extra_rows) or 'none'}")
        size = batch_size or config.per_device_batch_size

        ranks, me = distributed.world_size(), distributed.rank()

        def generate() -> Iterator[Batch]:
            # Several processes split the stream as they split the main data: rank r takes batches r, r + N, ...
            # (so N ranks see the batches one process would see over N micro-batches).
            gen = torch.Generator().manual_seed(config.seed if seed is None else seed)
            k = 0
            while True:
                order = torch.randperm(len(rows), generator=gen).tolist()
                for i in range(0, len(order), size):
                    k += 1
                    if (k - 1) % ranks != me:
                        continue
                    batch = collate([rows[j] for j in order[i : i + size]])
                    yield {k: v.to(device) for k, v in batch.items()}
                if not cycle:
                    return

        stream = BatchStream(generate())
        if len(streams) < len(resumed_counts):
            stream.skip(resumed_counts[len(streams)])
        streams.append(stream)
        return stream

    ctx = HookContext(
        config=config,
        tokenizer=tokenizer,
        out_dir=out,
        extra_datasets=extra_rows,
        batches=batches,
        lm_loss=lambda m, b: lm_loss_mean(m, b, logits_to_keep=use_ltk),
        device=device,
    )
    if resume_from is not None:
        resumed_counts.extend(load_hook_states([], resume_from))
    for hook in hooks:
        hook.setup(ctx)
    if resume_from is not None:
        load_hook_states(hooks, resume_from)
    masks = build_masks(trainable, hooks)
    extra_iterators = [it for it in (h.extra_batches() for h in hooks) if it is not None]

    args = TrainingArguments(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=_optimizer_name(config, torch),
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=config.save_steps if config.save_steps > 0 else 500,
        save_total_limit=config.save_total_limit,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if config.batching == "group-by-length" else "random",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        # on a CPU, several launched processes train with DDP over gloo only when the Trainer is told it is a CPU run
        use_cpu=device.type == "cpu",
        **_fsdp_arguments(config),
    )
    callback = EngineCallback(hooks, masks, progress, streams)
    trainer = HookedTrainer(
        model=trainable,
        args=args,
        train_dataset=features(encoded),
        data_collator=collate,
        callbacks=[callback],
        hooks=hooks,
        extra_iterators=extra_iterators,
        logits_to_keep=use_ltk,
        context=ctx,
    )
    callback.trainer = trainer
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    try:
        with cpu_training(trainable, reserve=reserve):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    finally:
        callback.close()
        for hook in hooks:
            hook.teardown(trainable)
    trainable.eval()

    target = out / MODEL_DIR
    saved = _save_final(trainable, tokenizer, target) if main else target
    tokens = int(distributed.all_reduce_sum(float(trainer.tokens_seen)))
    seconds = callback.seconds
    metrics = TrainMetrics(
        losses=callback.losses,
        start_step=callback.start_step,
        steps=trainer.state.global_step,
        examples=len(encoded),
        dropped_examples=len(dataset) - len(encoded),
        truncated_examples=sum(1 for e in encoded if e.truncated),
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        trainable_parameters=sum(p.numel() for p in trainable.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in trainable.parameters()),
        target_modules=targets,
        hook_metrics=callback.hook_metrics,
    )
    if main:
        atomic_write_json(out / METRICS_FILE, asdict(metrics))
    distributed.barrier()  # every rank returns once rank 0 has saved the model
    distributed.training_finished()
    lora = config.method == "lora"
    return TrainResult(
        model=trainable,
        adapter_dir=saved if lora else None,
        weights_dir=None if lora else saved,
        metrics=metrics,
        checkpoint_dir=ckpt_root,
    )


def _fsdp_arguments(config: TrainConfig) -> dict[str, Any]:
    """TrainingArguments for FSDP (``config.fsdp``): full sharding, wrapped per decoder layer, original parameters."""
    if not config.fsdp:
        return {}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"use_orig_params": True, "sync_module_states": True, "activation_checkpointing": False},
    }


def _check_fsdp(model: Any, config: TrainConfig, hooks: Sequence[TrainingHook]) -> None:
    """Refuse FSDP where it cannot shard the run: hooks (they see sharded weights), a quantized base, no GPUs."""
    if not config.fsdp:
        return
    if hooks:
        names = ", ".join(h.name for h in hooks)
        raise UsageError(
            f"training.fsdp: hooks ({names}) read and edit whole weights and gradients, which FSDP shards across "
            "processes; train this run with DDP (training.fsdp: false)"
        )
    if config.method == "lora" and (
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "quantization_method", None) is not None
    ):
        raise UsageError(
            "training.fsdp: LoRA on a quantized base cannot be sharded (its packed weights are not plain "
            "parameters); load the base unquantized or train with DDP (training.fsdp: false)"
        )
    import torch

    if not torch.cuda.is_available():
        raise UsageError("training.fsdp: FSDP shards over CUDA devices and this machine has none; use DDP "
                         "(--processes N, training.fsdp: false)")  # fmt: skip
    if not distributed.is_launched():
        raise UsageError("training.fsdp: needs several processes (accelerate launch, or --processes N)")


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear projections inside the model's decoder layers (attention and MLP)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    in_layers: set[str] = set()
    anywhere: set[str] = set()
    for qual, mod in base.named_modules():
        if mod is head or not (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"):
            continue
        leaf = qual.rsplit(".", 1)[-1]
        anywhere.add(leaf)
        if _LAYER_RE.search(qual):
            in_layers.add(leaf)
    return sorted(in_layers or anywhere)


def _resolve_targets(model: Any, config: TrainConfig) -> list[str]:
    """The LoRA target modules, validated against the model (empty for full fine-tuning)."""
    if config.method == "full":
        if hasattr(model, "get_base_model"):
            raise UsageError("method 'full': the model carries a PEFT adapter; merge it first or use method 'lora'")
        return []
    if hasattr(model, "peft_config"):  # continue training the loaded adapter
        targets = getattr(model.peft_config[model.active_adapter], "target_modules", None) or []
        return sorted(str(t) for t in targets)
    available = linear_module_names(model)
    targets = list(config.lora_target_modules) if config.lora_target_modules else available
    missing = [t for t in targets if t not in available]
    if missing:
        raise UsageError(
            f"lora_target_modules: the model has no linear module {missing[0]!r}; it has: {', '.join(available)}"
        )
    return targets


def _prepare_method(model: Any, config: TrainConfig, targets: list[str]) -> Any:
    """Wrap ``model`` for LoRA on ``targets``, or unfreeze it for full fine-tuning."""
    if config.method == "full":
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _optimizer_name(config: TrainConfig, torch: Any) -> str:
    if config.optimizer == "sgd":
        return "sgd"
    if config.optimizer == "adamw-fused" and _fused_adamw_available(torch):
        return "adamw_torch_fused"
    return "adamw_torch"


def _fused_adamw_available(torch: Any) -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True


def _resolve_resume(ckpt_root: Path, resume: bool | str | Path) -> Path | None:
    existing = _checkpoints(ckpt_root)
    if resume is False:
        if existing:
            raise UsageError(f"{ckpt_root}: holds checkpoints of an earlier run; resume it or choose a new out_dir")
        return None
    if resume is True:
        if not existing:
            raise UsageError(f"{ckpt_root}: no checkpoint-N directory to resume from")
        return existing[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"{path}: not a training checkpoint (expected trainer_state.json in it)")
    return path


def _checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _save_final(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save the adapter (PEFT) or the weights as safetensors into ``target``, atomically (temp dir + rename)."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        model.save_pretrained(str(tmp))
    if not any(tmp.glob("*.safetensors")):
        raise RuntimeError(f"{tmp}: save_pretrained wrote no safetensors file")
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
