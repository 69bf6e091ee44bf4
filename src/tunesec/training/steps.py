"""Tools for hooks that change a training step: extra passes, perturbed weights, activation taps, snapshots.

The engine's hooks API (:mod:`tunesec.training.hooks`) says *when* a hook runs; this module gives the pieces
that perturbation- and representation-based defenses and adaptive attacks are made of (the spec's R1-R4):

- **R2, a step closure** (SAM-style extra passes): :func:`gradient` (gradients of a loss w.r.t. chosen
  parameters, without touching ``.grad``), :func:`global_norm`, :func:`perturbed` (add a step to the weights
  for a block and restore them *exactly* afterwards, by copy, not by subtraction), :func:`add_to_grad`.
- **R1, activation hooks**: :class:`ActivationTap` records the outputs of named modules (attention, MLP,
  decoder layers) in a forward pass, returns gradients w.r.t. them, captures their gradients during a normal
  backward pass, or adds tensors to them in later forward passes.
- **R3, frozen snapshots / a reference model**: :class:`WeightSnapshot` copies parameters and can swap the copy
  in for a block (a reference model's log-probabilities without a second model in memory), and
  :func:`token_logprobs` gives per-token log-probabilities of a batch's assistant tokens.
- **R4, step-indexed schedules**: :class:`StepClock` (the optimizer step, micro-batch and progress, kept by the
  engine in ``HookContext.clock``) and :func:`step_rng` (a random stream per step that a resumed run redraws
  identically).

Everything here runs under the engine (torch is imported by the functions that need it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tunesec.training.hooks import Batch

Params = Sequence["torch.nn.Parameter"]

# Child-module names of a decoder layer's attention and MLP blocks across common architectures.
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)$")


# -- R4: the step clock ------------------------------------------------------------------------------------


@dataclass
class StepClock:
    """Where training is: kept up to date by the engine, read by hooks (``ctx.clock``).

    Attributes:
        step: Optimizer steps finished (0 during the first step; after a resume, the checkpoint's step).
        max_steps: Optimizer steps of the whole run.
        micro: Index of the current micro-batch within the optimizer step (0 .. accumulation - 1).
        accumulation: Micro-batches per optimizer step (``gradient_accumulation_steps``).
    """

    step: int = 0
    max_steps: int = 1
    micro: int = 0
    accumulation: int = 1

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1] (VAA's epoch / epochs)."""
        return min(max(self.step / max(self.max_steps, 1), 0.0), 1.0)

    def every(self, k: int) -> bool:
        """True on the first micro-batch of every ``k``-th optimizer step (steps 0, k, 2k, ...)."""
        return self.micro == 0 and self.step % max(k, 1) == 0


def step_rng(seed: int | str, clock: StepClock, salt: str = "") -> random.Random:
    """A random stream for this optimizer step and micro-batch: the same after a resume, whatever ran before."""
    return random.Random(f"{seed}:{salt}:{clock.step}:{clock.micro}")


# -- R2: gradients, perturbations ----------------------------------------------------------------------------


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that training updates (``requires_grad``), with their names, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gradient(loss: torch.Tensor, params: Params, *, retain_graph: bool = False) -> list[torch.Tensor]:
    """Gradients of ``loss`` w.r.t. ``params`` (zeros where a parameter does not reach it); ``.grad`` untouched."""
    import torch

    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors taken together (the norm SAM, Vaccine, Booster and CTRAP normalise by)."""
    import torch

    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


class Perturbation:
    """Weights moved by ``scale * direction`` until :meth:`restore` copies their earlier values back.

    For a perturbation that spans hook calls (applied in ``before_step``, undone in ``after_step``); within one
    call use :func:`perturbed`. Copying back, rather than subtracting, restores the weights bit for bit.
    """

    def __init__(self, params: Params, direction: Sequence[torch.Tensor], scale: float | torch.Tensor) -> None:
        import torch

        self.params = list(params)
        self.saved: list[torch.Tensor] | None = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, d in zip(self.params, direction, strict=True):
                p.add_(d.to(p.dtype), alpha=float(scale))

    def restore(self) -> None:
        """Put the earlier values back (idempotent)."""
        import torch

        if self.saved is None:
            return
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)
        self.saved = None


@contextmanager
def perturbed(params: Params, direction: Sequence[torch.Tensor], scale: float | torch.Tensor) -> Iterator[None]:
    """Inside the block, every ``p`` is ``p + scale * d``; afterwards it holds exactly its earlier value.

    The earlier values are copied and copied back (``p - scale * d`` after ``p + scale * d`` is not always
    ``p`` in floating point). Edits happen in place under ``torch.no_grad()``, as the optimizer's do.
    """
    move = Perturbation(params, direction, scale)
    try:
        yield
    finally:
        move.restore()


NORM_EPS = 1e-7  # added to gradient norms before dividing, as the official Vaccine/Booster/CTRAP/VAA code does


def unit_step(direction: Sequence[torch.Tensor], radius: float) -> float:
    """The scale that moves by ``radius`` along ``direction``: ``radius / (||direction|| + 1e-7)`` (global norm)."""
    return radius / (float(global_norm(direction)) + NORM_EPS)


def add_to_grad(params: Params, tensors: Sequence[torch.Tensor], weight: float = 1.0) -> None:
    """``p.grad += weight * t`` for each parameter (creating ``.grad`` where it is None)."""
    import torch

    with torch.no_grad():
        for p, t in zip(params, tensors, strict=True):
            if p.grad is None:
                p.grad = (weight * t).to(p.dtype).clone()
            else:
                p.grad.add_(t.to(p.grad.dtype), alpha=weight)


# -- R1: activation taps -------------------------------------------------------------------------------------


def find_modules(model: Any, kind: str) -> list[tuple[str, torch.nn.Module]]:
    r"""The decoder layers' ``attention`` or ``mlp`` blocks, or the ``layer`` blocks themselves, in depth order.

    Also accepts a regular expression over qualified module names (``re.search``), e.g. ``"layers[.]\d+$"``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [(n, m) for n, m in base.named_modules() if _LAYER_RE.search(n)]
    if kind == "layer":
        found = layers
    elif kind in ("attention", "mlp"):
        names = _ATTENTION_NAMES if kind == "attention" else _MLP_NAMES
        found = []
        for lname, layer in layers:
            child = next(((c, getattr(layer, c)) for c in names if hasattr(layer, c)), None)
            if child is not None:
                found.append((f"{lname}.{child[0]}", child[1]))
    else:
        pattern = re.compile(kind)
        found = [(n, m) for n, m in base.named_modules() if n and pattern.search(n)]
    if not found:
        raise ValueError(f"find_modules: the model has no {kind!r} modules")
    return found


def layer_index(name: str) -> int:
    """The decoder-layer number in a qualified module or parameter name (``...layers.7.self_attn`` -> 7)."""
    m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)", name)
    if m is None:
        raise ValueError(f"{name!r} is not inside a numbered decoder layer")
    return int(m.group(1))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ActivationTap:
    """Forward and backward hooks on named modules (R1): record outputs, their gradients, or add to them.

    A module's output is its first tensor when it returns a tuple (HF attention returns ``(out, weights)``).
    Use one method at a time; each removes its hooks when its block ends::

        tap = ActivationTap(model, "attention")
        with tap.recording():
            loss = ctx.lm_loss(model, batch)
        grads = tap.output_gradients(loss)           # {module name: dL/d output}
        with tap.adding({name: eps for ...}):        # later forward passes see output + eps
            ...
        with tap.capturing_gradients():              # dL/d output recorded during a normal backward
            loss.backward()
    """

    def __init__(self, model: Any, modules: str | Sequence[tuple[str, torch.nn.Module]] = "attention") -> None:
        self.modules = list(find_modules(model, modules) if isinstance(modules, str) else modules)
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        """Qualified names of the tapped modules, in depth order."""
        return [n for n, _ in self.modules]

    @contextmanager
    def _hooks(self, make: Any, names: Sequence[str] | None = None) -> Iterator[None]:
        wanted = set(self.names if names is None else names)
        handles = [m.register_forward_hook(make(n)) for n, m in self.modules if n in wanted]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def recording(self, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Forward passes in the block store each module's output (with its graph) in ``self.outputs``."""
        self.outputs = {}

        def make(name: str) -> Any:
            def hook(_mod: Any, _inp: Any, output: Any) -> None:
                self.outputs[name] = _first(output)

            return hook

        with self._hooks(make, names):
            yield self.outputs

    def output_gradients(self, loss: torch.Tensor, *, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """``dloss / d output`` of every recorded module (no parameter gradients are computed or kept)."""
        import torch

        names = list(self.outputs)
        grads = torch.autograd.grad(
            loss, [self.outputs[n] for n in names], retain_graph=retain_graph, allow_unused=True
        )
        out = {
            n: torch.zeros_like(self.outputs[n]) if g is None else g.detach() for n, g in zip(names, grads, strict=True)
        }
        self.outputs = {}
        return out

    @contextmanager
    def capturing_gradients(self, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """A backward pass through a forward pass made in the block records ``dL / d output`` in ``self.grads``."""
        self.grads = {}

        def make(name: str) -> Any:
            def hook(_mod: Any, _inp: Any, output: Any) -> None:
                t = _first(output)
                if t.requires_grad:
                    t.register_hook(lambda g, n=name: self.grads.__setitem__(n, g.detach()))

            return hook

        with self._hooks(make, names):
            yield self.grads

    @contextmanager
    def adding(self, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
        """Forward passes in the block see ``output + deltas[name]`` for each named module (Vaccine's pass 2)."""

        def make(name: str) -> Any:
            def hook(_mod: Any, _inp: Any, output: Any) -> Any:
                delta = deltas[name]
                if isinstance(output, tuple):
                    return (output[0] + delta.to(output[0].dtype), *output[1:])
                return output + delta.to(output.dtype)

            return hook

        with self._hooks(make, list(deltas)):
            yield


# -- R3: snapshots and reference log-probabilities ---------------------------------------------------------


class WeightSnapshot:
    """A frozen copy of parameters (R3): the aligned weights for a proximal term, or a reference model.

    ``swapped_in()`` puts the copy into the model for a block and restores the live weights exactly after it,
    so a reference model's outputs cost one forward pass and no second model in memory.
    """

    def __init__(self, named: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.values = [p.detach().clone() for p in self.params]

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the snapshot; afterwards their live values again."""
        import torch

        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, v in zip(self.params, self.values, strict=True):
                    p.copy_(v)
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    def save(self, path: str | Path) -> None:
        """Write the copy as safetensors (atomically), so a resumed run gets the same reference.

        With several processes only rank 0 writes (every rank holds the same copy).
        """
        from safetensors.torch import save_file

        from tunesec.training.distributed import is_main_process

        if not is_main_process():
            return

        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        save_file({n: v.contiguous() for n, v in zip(self.names, self.values, strict=True)}, str(tmp))
        tmp.replace(target)

    def load(self, path: str | Path) -> None:
        """Read a copy written by :meth:`save` (the parameter names must match)."""
        from safetensors.torch import load_file

        saved = load_file(str(path))
        missing = [n for n in self.names if n not in saved]
        if missing:
            raise ValueError(f"{path}: snapshot lacks {missing[0]!r}")
        self.values = [saved[n].to(p.device, p.dtype) for n, p in zip(self.names, self.params, strict=True)]

    def sq_distance(self) -> torch.Tensor:
        """``sum ||p - snapshot||^2`` over the parameters, differentiable in the live weights (Lisa's proximal term)."""
        import torch

        total = torch.zeros((), device=self.params[0].device if self.params else None)
        for p, v in zip(self.params, self.values, strict=True):
            total = total + ((p - v) ** 2).sum()
        return total


def token_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Log-probabilities of a batch's assistant tokens, in the order of ``labels[..., 1:] != -100``.

    Use it under ``torch.no_grad()`` inside :meth:`WeightSnapshot.swapped_in` (or a PEFT model's
    ``disable_adapter()``) for a reference model's values (NPO, token-wise constrained SFT).
    """
    import torch

    from tunesec.training.collate import IGNORE_INDEX

    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, :-1][keep]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)


def example_losses(
    model: Any, tokenizer: Any, examples: Sequence[Any], *, max_seq_len: int = 1024, batch_size: int = 8
) -> dict[str, float]:
    """Mean assistant-token cross-entropy of each example, by example id (forward passes only, no gradients).

    Used to find which examples a change to the model "forgets" (VAA's vulnerable group). Examples are packed
    into rows of ``batch_size`` (as the engine trains), the vocabulary projection is computed only where an answer
    token is predicted, and on a CPU the linear layers run on the inference kernels; an example left with no
    assistant token after truncation has no entry.
    """
    import contextlib

    import torch
    import torch.nn.functional as F  # noqa: N812

    from tunesec.models.cpu_kernels import cpu_inference
    from tunesec.training.collate import IGNORE_INDEX, chat_renderer, collate_packed, encode_dataset, features
    from tunesec.training.trainer import accepts_logits_to_keep

    encoded = encode_dataset(examples, tokenizer, chat_renderer(tokenizer), max_seq_len, what="examples")
    device = next(model.parameters()).device
    use_ltk = accepts_logits_to_keep(model)
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    kernels = cpu_inference(model) if device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), kernels:
        for start in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate_packed(features(chunk)).items()}
            keep = batch["labels"][:, 1:] != IGNORE_INDEX
            idx = keep[0].nonzero().squeeze(-1)
            kwargs: dict[str, Any] = {"logits_to_keep": idx} if use_ltk else {}
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs
            ).logits
            logits = logits[0] if use_ltk else logits[0, :-1][keep[0]]
            nll = F.cross_entropy(logits.float(), batch["labels"][0, 1:][keep[0]], reduction="none")
            seg = sequence_ids(batch)
            sums = torch.zeros(len(chunk), dtype=nll.dtype, device=nll.device).index_add(0, seg, nll)
            counts = torch.zeros(len(chunk), dtype=nll.dtype, device=nll.device).index_add(0, seg, torch.ones_like(nll))
            for e, total, n in zip(chunk, sums.tolist(), counts.tolist(), strict=True):
                out[e.example_id] = total / max(n, 1.0)
    model.train(was_training)
    return out


def sequence_ids(batch: Batch) -> torch.Tensor:
    """For each assistant token of ``batch`` (in ``token_logprobs`` order), the index of the example it belongs to.

    Packed rows (the padding-free collator) start a new example wherever ``position_ids`` restarts at 0; in padded
    batches each row is one example.
    """
    import torch

    from tunesec.training.collate import IGNORE_INDEX

    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    if "position_ids" in batch:
        starts = (batch["position_ids"] == 0).long()
        seg = torch.cumsum(starts.flatten(), dim=0).view_as(starts) - 1
    else:
        rows = torch.arange(batch["labels"].shape[0], device=keep.device)
        seg = rows[:, None].expand_as(batch["labels"])
    return seg[:, 1:][keep]


def sequence_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Each example's summed log-probability of its assistant tokens (NPO's log pi(y|x)), one value per example."""
    import torch

    lp = token_logprobs(model, batch)
    seg = sequence_ids(batch)
    n = int(seg.max()) + 1 if seg.numel() else 0
    return torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, seg, lp)


def logit_lens_losses(model: Any, batch: Batch, hidden_states: Sequence[torch.Tensor], tokens: int | None = None,
                      rng: random.Random | None = None) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of the answer tokens read out from each hidden state through the final norm and LM head.

    One value per hidden state (RepNoise's and SEAM's "logit lens"). With ``tokens``, only that many answer
    positions (drawn with ``rng``) are scored: all of them over every layer would hold layers x tokens x vocab logits.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    from tunesec.training.collate import IGNORE_INDEX

    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    targets = batch["labels"][:, 1:][keep]
    pick = None
    if tokens is not None and targets.numel() > tokens:
        chosen = sorted((rng or random.Random(0)).sample(range(targets.numel()), tokens))
        pick = torch.tensor(chosen, dtype=torch.long, device=targets.device)
        targets = targets[pick]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None) or getattr(base, "transformer", None)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "ln_f", None)
    if norm is None:
        raise ValueError("logit lens: cannot find the decoder's final norm (model.norm / transformer.ln_f)")
    head = base.get_output_embeddings()
    out = []
    for h in hidden_states:
        states = h[:, :-1][keep]
        if pick is not None:
            states = states[pick]
        out.append(F.cross_entropy(head(norm(states)).float(), targets))
    return torch.stack(out)
