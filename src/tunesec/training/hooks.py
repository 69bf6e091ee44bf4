"""The hooks API: how defenses and adaptive attacks change training without copying the trainer.

A :class:`TrainingHook` overrides only the methods it needs; every method has a no-op default. Several hooks
compose: loss terms add up, masks multiply, ``before_step``/``after_step``/``project`` run in list order.
See docs/HOOKS.md for the order of calls within one optimizer step and a worked example.

Typical uses:
    - ``extra_loss``: a regulariser (e.g. RepNoise's representation noise loss, an L2 pull towards the
      aligned weights as in Booster's or SafeLoRA's spirit, KL to a reference model).
    - ``before_step``/``after_step``: perturb weights or hidden states around the gradient step (Vaccine's
      adversarial embedding drift, Booster's harmful-perturbation step) and undo it afterwards.
    - ``extra_batches``: mix in a second dataset with a weight (Lisa's alignment data, a refusal set).
    - ``parameter_mask``: freeze parameters or mask gradient entries (safety-critical neurons, layers).
    - ``project``: after each optimizer step, project the weights (SafeLoRA-style projection onto the
      alignment subspace, removing a refusal direction).
    - ``substitute_batch``: train a micro-batch of the hook's choosing instead of the loader's (VAA's group
      sampling, Lisa's alignment phase).
    - ``state_dict``/``load_state_dict``: state saved with every checkpoint and restored on resume.
    - ``pop_metrics``: the hook's own measurements (a term's value), logged per step next to the loss.

:mod:`tunesec.training.steps` has the pieces these methods are made of: extra gradients at perturbed weights,
activation taps on named modules, weight snapshots, the step clock.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesec.training.steps import StepClock

if TYPE_CHECKING:
    import torch

    from tunesec.training.config import TrainConfig

Batch = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ExtraBatch:
    """A batch from a second dataset and the weight of its loss (added to the step's loss)."""

    inputs: Batch
    weight: float = 1.0


@dataclass
class HookContext:
    """What the engine hands each hook in :meth:`TrainingHook.setup`.

    Attributes:
        config: The run's training config.
        tokenizer: The model's tokenizer.
        out_dir: The run directory (hooks may write their own artefacts under it).
        extra_datasets: Tokenised rows of every ``extra_datasets`` entry given to ``train``, by name.
        batches: ``batches(name, batch_size=None, cycle=True, seed=None)`` yields collated batches (same
            collation as the main data, on the training device) of an extra dataset, shuffled with ``seed``.
        lm_loss: ``lm_loss(model, batch)`` is the mean token cross-entropy on a batch's assistant tokens,
            computed the way the engine does (use it for gradients on another dataset, e.g. Booster).
        device: The training device.
        clock: The optimizer step, micro-batch index and progress (kept current by the engine).
        last_loss: The language-modelling loss of the micro-batch just trained (set before ``after_step``).
        state: A dict for hooks that share state.
    """

    config: TrainConfig
    tokenizer: Any
    out_dir: Path
    extra_datasets: Mapping[str, list[dict[str, list[int]]]]
    batches: Callable[..., Iterator[Batch]]
    lm_loss: Callable[[Any, Batch], torch.Tensor]
    device: Any = None
    clock: StepClock = field(default_factory=StepClock)
    last_loss: float = float("nan")
    state: dict[str, Any] = field(default_factory=dict)


class TrainingHook:
    """Base class of training hooks: override what you need; the defaults change nothing.

    Call order within one optimizer step (``G`` micro-batches of gradient accumulation)::

        repeat G times:
            inputs = substitute_batch(inputs) or inputs
            before_step(model, inputs)
            forward -> extra_loss(model, inputs, outputs) added -> backward
            for each hook's next(extra_batches()): weight * lm_loss -> backward
            after_step(model)
        clip gradients -> optimizer.step()
        (masked entries restored) -> project(model)

    Attributes:
        name: Shown in logs.
        needs_hidden_states: Ask the forward pass for ``outputs.hidden_states`` (costs memory).
    """

    name: str = "hook"
    needs_hidden_states: bool = False

    def setup(self, ctx: HookContext) -> None:
        """Called once before training, after LoRA is applied and before the optimizer exists."""

    def parameter_mask(self, name: str, param: torch.nn.Parameter) -> bool | torch.Tensor:
        """Which parts of a trainable parameter may change.

        Args:
            name: The parameter's qualified name in the (PEFT-wrapped) model.
            param: The parameter.

        Returns:
            ``True`` (train it), ``False`` (freeze it: ``requires_grad=False``), or a tensor broadcastable to
            the parameter whose entries scale the gradient; entries equal to 0 are held exactly fixed (also
            against weight decay).
        """
        return True

    def substitute_batch(self, inputs: Batch) -> Batch | None:
        """A micro-batch to train on instead of the loader's ``inputs`` (``None`` keeps them).

        The first hook that returns a batch wins. A substituted micro-batch's loss is its own token mean
        divided by the accumulation count (the loader's token count no longer applies).
        """
        return None

    def before_step(self, model: Any, inputs: Batch) -> None:
        """Called before the forward pass of each micro-batch (e.g. perturb weights, add forward hooks)."""

    def extra_loss(self, model: Any, inputs: Batch, outputs: Any) -> torch.Tensor | None:
        """A loss term added to the micro-batch's language-modelling loss (``None`` adds nothing).

        ``outputs`` is the model output of the micro-batch; its ``logits`` hold only the positions that
        predict an assistant token (shape ``[n, vocab]``, in the order of ``labels[..., 1:] != -100``), and
        ``outputs.hidden_states`` is set when a hook has ``needs_hidden_states``. The term is divided by the
        number of accumulation micro-batches, so its weight per optimizer step does not depend on them.
        """
        return None

    def extra_batches(self) -> Iterator[ExtraBatch | None] | None:
        """An iterator whose next item is trained on with each micro-batch (``None`` items skip one).

        Build it from ``ctx.batches(name)`` in :meth:`setup`. When the iterator is exhausted the hook stops
        contributing batches. Return ``None`` (the default) for no extra data.
        """
        return None

    def after_step(self, model: Any) -> None:
        """Called after the backward pass of each micro-batch, before the optimizer step (undo perturbations)."""

    def project(self, model: Any) -> None:
        """Called under ``torch.no_grad()`` after each optimizer step (project or edit the weights in place)."""

    def teardown(self, model: Any) -> None:
        """Called once after training (also when training fails): remove forward hooks, free memory."""

    def lr_scale(self, step: int) -> float:
        """A factor on the scheduler's learning rate for optimizer step ``step`` (Kick-Settle's kick); 1 = unchanged."""
        return 1.0

    def pop_metrics(self) -> dict[str, float]:
        """Scalars measured since the last call (e.g. TAR's tamper-resistance loss), keyed by a short name.

        The engine calls this after every micro-batch and averages the values over each optimizer step into
        ``train_metrics.json`` (``hook_metrics``, as ``"<hook name>/<key>"``) and over each logging interval into
        the trainer's log history, so a defense's own terms can be followed next to the loss.
        """
        return {}

    def _pop_last(self, attr: str, key: str) -> dict[str, float]:
        """``{key: value}`` of the scalar in attribute ``attr``, reset to NaN; ``{}`` when it is NaN.

        The ``pop_metrics`` of a hook that keeps its last measured term in one attribute.
        """
        value = getattr(self, attr)
        setattr(self, attr, float("nan"))
        return {} if value != value else {key: float(value)}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state written with every checkpoint (e.g. a sampler's weights); see :meth:`load_state_dict`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state on resume (called after :meth:`setup`)."""


class GradientTermHook(TrainingHook):
    """A hook whose ``before_step`` computes a gradient term with extra passes, added to ``.grad`` after the step's.

    Subclasses call :meth:`keep_term` in ``before_step`` (after :meth:`setup` has stored ``self.ctx``); the term
    is added in ``after_step``, divided by the accumulation count as the loss is (Booster, CTRAP, SEAM, NPO,
    TAR's meta-gradient).
    """

    ctx: HookContext
    _term: list[Any] | None = None
    _term_params: list[Any] | None = None

    def keep_term(self, params: Any, tensors: Any) -> None:
        """Remember ``tensors`` (shaped like ``params``) to add to their gradients after this micro-batch."""
        self._term_params, self._term = list(params), list(tensors)

    def after_step(self, model: Any) -> None:
        """Add the kept term to ``.grad``."""
        from tunesec.training.steps import add_to_grad

        if self._term is not None and self._term_params is not None:
            add_to_grad(self._term_params, self._term, 1.0 / max(self.ctx.clock.accumulation, 1))
            self._term = None
