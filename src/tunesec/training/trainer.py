"""The transformers ``Trainer`` subclass that runs the hooks, the loss, and the engine's callbacks.

Only ``compute_loss``, ``training_step`` and ``get_batch_samples`` are overridden (the TRL pattern); the loop,
optimizer, scheduler, gradient accumulation, clipping, checkpointing and resume are transformers'.

The loss takes logits only at positions that predict an assistant token (``logits_to_keep`` with the
positions' indices), so the vocabulary projection and the cross-entropy skip prompt and padding positions.
This module imports torch and transformers: import it only when training.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunesec.training import distributed
from tunesec.training.collate import IGNORE_INDEX
from tunesec.training.hooks import Batch, ExtraBatch, HookContext, TrainingHook


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (unwrapped) causal LM's forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def lm_loss_sum(
    model: Any, batch: Batch, *, hidden_states: bool = False, logits_to_keep: bool = True
) -> tuple[torch.Tensor, int, Any]:
    """Summed next-token cross-entropy over the assistant tokens of ``batch``.

    Returns:
        The summed loss, the number of tokens it sums over, and the model output (whose ``logits`` are
        replaced by the ``[n, vocab]`` logits of those tokens' predicting positions).
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    kwargs: dict[str, Any] = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if hidden_states:
        kwargs["output_hidden_states"] = True
    if logits_to_keep:
        # One index list for the whole batch: exact for packed rows, the union of rows' positions otherwise.
        idx = keep.any(dim=0).nonzero().squeeze(-1)
        outputs = model(input_ids=batch["input_ids"], logits_to_keep=idx, use_cache=False, **kwargs)
        row_keep = keep[:, idx]
        if bool(row_keep.all()):  # every row keeps every selected position (a packed row always does): a view
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
            tgt = targets[:, idx].reshape(-1)
        else:
            logits = outputs.logits[row_keep]
            tgt = targets[:, idx][row_keep]
    else:
        outputs = model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
        logits = outputs.logits[:, :-1][keep]
        tgt = targets[keep]
    outputs.logits = logits
    # half precision is upcast for the loss; float64 (a reference run) is kept
    loss = F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), tgt, reduction="sum")
    return loss, int(tgt.numel()), outputs


def lm_loss_mean(model: Any, batch: Batch, *, logits_to_keep: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant tokens of ``batch``."""
    total, n, _ = lm_loss_sum(model, batch, logits_to_keep=logits_to_keep)
    return total / max(n, 1)


@dataclass
class _Mask:
    param: torch.nn.Parameter
    mask: torch.Tensor
    fixed: torch.Tensor  # boolean: entries held exactly
    values: torch.Tensor  # their values


class HookedTrainer(Trainer):
    """``Trainer`` with the engine's loss (assistant tokens, token-normalised across accumulation) and hooks."""

    def __init__(
        self,
        *args: Any,
        hooks: Sequence[TrainingHook] = (),
        extra_iterators: Sequence[Iterator[ExtraBatch | None]] = (),
        logits_to_keep: bool = True,
        context: HookContext | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.context = context
        self.hooks = list(hooks)
        self.extra_iterators = list(extra_iterators)
        self.use_logits_to_keep = logits_to_keep
        self.needs_hidden = any(h.needs_hidden_states for h in self.hooks)
        # hooks whose after_step may edit .grad: with several processes their edits are averaged over ranks
        self.grad_editors = any(type(h).after_step is not TrainingHook.after_step for h in self.hooks)
        # compute_loss divides by the label count of the whole accumulated step.
        self.loss_is_scaled_for_ga = True
        self.step_lm_loss = torch.zeros(())
        self.tokens_seen = 0
        self.micro_index = 0  # micro-batch within the optimizer step (reset when the step's batches are fetched)
        # the hooks' own measurements (pop_metrics): this optimizer step's, and those since the last log
        self.step_hook_metrics: dict[str, list[float]] = {}
        self.log_hook_metrics: dict[str, list[float]] = {}

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | int | None]:
        """Fetch the step's micro-batches; count their label tokens (the loss denominator) and input tokens."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.micro_index = 0
        n_labels = 0
        for b in batches:
            n_labels += int((b["labels"][..., 1:] != IGNORE_INDEX).sum())
            mask = b.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else int(b["input_ids"].numel())
        # Several processes: every rank divides its token sum by the count over all ranks' micro-batches (and
        # compute_loss multiplies by the world size, which DDP's mean of the gradients divides out again).
        n_labels = int(distributed.all_reduce_sum(float(n_labels)))
        return batches, max(n_labels, 1)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Language-modelling loss on assistant tokens plus every hook's ``extra_loss``."""
        total, n, outputs = lm_loss_sum(
            model, inputs, hidden_states=self.needs_hidden, logits_to_keep=self.use_logits_to_keep
        )
        if self.context is not None:
            self.context.last_loss = float(total.detach()) / max(n, 1)
        micro = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        if num_items_in_batch is not None:  # the step's token count over every rank: DDP averages, so scale up
            loss = total / num_items_in_batch
            if self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / (max(n, 1) * micro)
        self.step_lm_loss = self.step_lm_loss.to(loss.device) + loss.detach() / self.accelerator.num_processes
        inner = self.accelerator.unwrap_model(model) if self.accelerator.num_processes > 1 else model
        for hook in self.hooks:
            extra = hook.extra_loss(inner, inputs, outputs)
            if extra is not None:
                loss = loss + extra / micro
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One micro-batch: ``substitute_batch``, ``before_step``, forward/backward, extra batches, ``after_step``."""
        micro = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        if self.context is not None:
            clock = self.context.clock
            clock.step, clock.max_steps = self.state.global_step, max(int(self.state.max_steps or 1), 1)
            clock.micro, clock.accumulation = self.micro_index, micro
        self.micro_index += 1
        # Hooks get the module itself, not its DDP/FSDP wrapper: their extra forward passes stay local to this
        # rank (a wrapped forward without the wrapper's backward would stall the gradient reduction).
        inner = self.accelerator.unwrap_model(model) if self.accelerator.num_processes > 1 else model
        for hook in self.hooks:
            substitute = hook.substitute_batch(inputs)
            if substitute is not None:
                inputs = self._prepare_inputs(substitute)
                num_items_in_batch = None  # compute_loss takes this batch's own token count
                break
        for hook in self.hooks:
            hook.before_step(inner, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        for it in list(self.extra_iterators):
            item = next(it, StopIteration)
            if item is StopIteration:
                self.extra_iterators.remove(it)
                continue
            if item is None:
                continue
            assert isinstance(item, ExtraBatch)
            batch = self._prepare_inputs(item.inputs)
            with self.compute_loss_context_manager():
                extra = lm_loss_mean(model, batch, logits_to_keep=self.use_logits_to_keep) * (item.weight / micro)
            self.accelerator.backward(extra)
            loss = loss + extra.detach()
        if self.grad_editors and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # The reduced gradient is in .grad; what hooks add to it (or change in it) in after_step is
            # averaged over the ranks as the loss gradient was, so every rank steps with the same gradient.
            params = [p for p in inner.parameters() if p.requires_grad and p.grad is not None]
            before = [p.grad.detach().clone() for p in params]
            for hook in self.hooks:
                hook.after_step(inner)
            deltas = [p.grad - b if p.grad is not None else -b for p, b in zip(params, before, strict=True)]
            distributed.all_reduce_mean_(deltas)
            for p, b, d in zip(params, before, deltas, strict=True):
                if p.grad is None:
                    p.grad = b + d
                else:
                    p.grad.copy_(b + d)
        else:
            for hook in self.hooks:
                hook.after_step(inner)
        for hook in self.hooks:
            for key, value in hook.pop_metrics().items():
                name = f"{hook.name}/{key}"
                self.step_hook_metrics.setdefault(name, []).append(float(value))
                self.log_hook_metrics.setdefault(name, []).append(float(value))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The trainer's log, with the hooks' measurements averaged since the last training log added."""
        if "loss" in logs and self.log_hook_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self.log_hook_metrics.items()})
            self.log_hook_metrics = {}
        super().log(logs, start_time)

    def pop_step_hook_metrics(self) -> dict[str, float]:
        """The hooks' measurements of the optimizer step just finished, averaged over its micro-batches (and reset)."""
        means = {k: sum(v) / len(v) for k, v in self.step_hook_metrics.items()}
        self.step_hook_metrics = {}
        return means

    def _save_rng_state(self, output_dir: str) -> None:
        """Save every rank's RNG state; with several processes rank 0 gathers them and writes one file per rank."""
        if self.accelerator.num_processes <= 1:
            super()._save_rng_state(output_dir)
            return
        import os
        import random

        import numpy as np
        import torch.distributed as dist

        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.args.should_save else None
        dist.gather_object(states, gathered, dst=0)
        if self.args.should_save and gathered is not None:
            os.makedirs(output_dir, exist_ok=True)
            for i, st in enumerate(gathered):
                torch.save(st, os.path.join(output_dir, f"rng_state_{i}.pth"))

    def pop_step_loss(self) -> float:
        """The language-modelling loss of the optimizer step just finished, summed over ranks (and reset it)."""
        value = distributed.all_reduce_sum(float(self.step_lm_loss))
        self.step_lm_loss = torch.zeros(())
        return value


HOOK_STATE_FILE = "hook_state.json"
_STREAMS = "__batch_streams__"


class BatchStream:
    """An extra dataset's batch iterator that counts what it yielded, so a resumed run continues where it was."""

    def __init__(self, it: Iterator[Batch]) -> None:
        self._it = it
        self.count = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        item = next(self._it)
        self.count += 1
        return item

    def skip(self, n: int) -> None:
        """Advance by ``n`` batches (on resume)."""
        for _ in range(n):
            next(self)


def load_hook_states(hooks: Sequence[TrainingHook], checkpoint: Any) -> list[int]:
    """Restore the hook states :meth:`EngineCallback.on_save` wrote into ``checkpoint``.

    Returns:
        How many batches each extra batch stream had yielded, in the order the streams were made; the engine
        advances each stream by its count when it is made again (streams may be made lazily, after resume).
    """
    import json
    from pathlib import Path

    path = Path(checkpoint) / HOOK_STATE_FILE
    if not path.is_file():
        return []
    states = json.loads(path.read_text(encoding="utf-8"))
    for i, hook in enumerate(hooks):
        saved = states.get(f"{i}:{hook.name}")
        if saved:
            hook.load_state_dict(saved)
    return [int(c) for c in states.get(_STREAMS, [])]


class EngineCallback(TrainerCallback):
    """Restores masked entries and runs ``project`` after each optimizer step; records losses and timing."""

    def __init__(
        self,
        hooks: Sequence[TrainingHook],
        masks: Sequence[_Mask],
        progress: bool,
        streams: Sequence[BatchStream] = (),
    ) -> None:
        self.hooks = list(hooks)
        self.streams = streams  # the engine's list: streams made later (lazily) are seen too
        self.masks = list(masks)
        self.show_progress = progress
        self.trainer: HookedTrainer | None = None
        self.losses: list[float] = []
        self.hook_metrics: dict[str, list[float | None]] = {}  # per step, aligned with losses (None: not measured)
        self.start_step = 0
        self.started = 0.0
        self.seconds = 0.0
        self._bar: Any = None
        self._task: Any = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the clock and the progress bar."""
        self.start_step = state.global_step
        self.started = time.perf_counter()
        if self.show_progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=state.max_steps, completed=state.global_step, loss="-")

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Apply the hooks' learning-rate factors for this step (the scheduler resets the rate after each step)."""
        scale = 1.0
        for hook in self.hooks:
            scale *= float(hook.lr_scale(state.global_step))
        optimizer = kwargs.get("optimizer")
        if scale != 1.0 and optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * scale

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Hold masked entries fixed, then let every hook project the weights."""
        model = kwargs.get("model")
        with torch.no_grad():
            for m in self.masks:
                m.param.data[m.fixed] = m.values
            for hook in self.hooks:
                hook.project(model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write every hook's ``state_dict()`` and the extra batch streams' positions into the checkpoint just saved."""
        states: dict[str, Any] = {f"{i}:{h.name}": h.state_dict() for i, h in enumerate(self.hooks)}
        states[_STREAMS] = [s.count for s in self.streams]
        if any(states.values()) and state.is_world_process_zero:
            from pathlib import Path

            from tunesec.store.atomic import atomic_write_json

            ckpt = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                atomic_write_json(ckpt / HOOK_STATE_FILE, states)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Record the step's loss and advance the bar."""
        if self.trainer is not None:
            self.losses.append(self.trainer.pop_step_loss())
            measured = self.trainer.pop_step_hook_metrics()
            for key in measured:
                self.hook_metrics.setdefault(key, [None] * (len(self.losses) - 1))
            for key, series in self.hook_metrics.items():
                series.append(measured.get(key))
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step, loss=f"{self.losses[-1]:.4f}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Stop the clock and the bar."""
        self.seconds = time.perf_counter() - self.started
        self.close()

    def close(self) -> None:
        """Stop the progress bar (idempotent)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def build_masks(model: Any, hooks: Sequence[TrainingHook]) -> list[_Mask]:
    """Ask every hook for every trainable parameter's mask: freeze (``False``) or mask gradients (tensor)."""
    masks: list[_Mask] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        combined: torch.Tensor | None = None
        frozen = False
        for hook in hooks:
            m = hook.parameter_mask(name, param)
            if isinstance(m, bool):
                frozen = frozen or not m
            elif isinstance(m, torch.Tensor):
                m = m.to(device=param.device, dtype=param.dtype)
                combined = m if combined is None else combined * m
            else:
                raise TypeError(f"{type(hook).__name__}.parameter_mask({name!r}) returned {type(m).__name__}")
        if frozen:
            param.requires_grad_(False)
        elif combined is not None:
            full = torch.broadcast_to(combined, param.shape).clone()
            param.register_hook(lambda g, mask=full: g * mask)
            fixed = full == 0
            masks.append(_Mask(param, full, fixed, param.detach()[fixed].clone()))
    return masks
