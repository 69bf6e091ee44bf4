"""What the post-fine-tuning repairs share: resolving and loading the models, checks, and the repair run.

A repair is a function from (tuned, aligned[, base]) to a new model. Every model is loaded as dense weights
(a LoRA adapter is merged into its base with PEFT's ``merge_and_unload``), checked to have one architecture and
one set of parameter names and shapes, and the repair edits the tuned model's parameters in place; the result is
saved as safetensors (full weights plus tokenizer) in ``<run>/model`` with ``model_ref.json`` beside it.

Models are given as anything :class:`~tunesec.models.ref.ModelRef` parses (alias, model directory, adapter
directory, hub id) or as the run directory of ``tunesec attack`` / ``defend`` / ``finetune`` (its
``model_ref.json``, else its ``model/``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tunesec.config import Config
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef

if TYPE_CHECKING:
    import torch

STAGE = "post-fine-tuning"
THREAT_MODEL = "fine-tuning-api"
# a parameter inside a decoder block (``model.layers.3.self_attn.q_proj.weight``)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+\.")


# -- model specs ---------------------------------------------------------------------------------------------


def resolve_model(spec: str | Path | ModelRef, *, role: str, base: str | None = None) -> ModelRef:
    """The ref of ``spec``: a run directory (its ``model_ref.json`` or ``model/``) or a model spec string.

    Args:
        spec: Alias, model or adapter directory, hub id, run directory, or a ref.
        role: ``tuned``, ``aligned`` or ``base``, for messages.
        base: Base model for an adapter directory, overriding the adapter's own record.
    """
    if isinstance(spec, ModelRef):
        ref = spec
    else:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "run.json").is_file():
            ref_file = path / "model_ref.json"
            if ref_file.is_file() and base is None:
                try:
                    ref = ModelRef.model_validate(json.loads(ref_file.read_text(encoding="utf-8")))
                except (OSError, ValueError) as err:
                    raise UsageError(f"--{role} {path}: unreadable model_ref.json ({err})") from None
            elif (path / "model").is_dir():
                ref = ModelRef.parse(str(path / "model"), base=base)
            else:
                raise UsageError(f"--{role} {path}: run directory without a model (no model_ref.json or model/)")
        else:
            ref = ModelRef.parse(str(spec), base=base)
    if ref.is_endpoint:
        raise UsageError(f"--{role} {ref.base}: an API endpoint has no weights; a repair needs open weights")
    if ref.kind == "gguf":
        raise UsageError(f"--{role} {ref.base}: a GGUF file is quantized; give the model directory it came from")
    return ref


def ref_spec(ref: ModelRef) -> str:
    """The spec string that names ``ref`` on the command line (its adapter directory, else its base)."""
    if ref.adapter is not None and ref.kind != "alias":
        return ref.adapter
    return f"{ref.base}@{ref.revision}" if ref.revision else ref.base


def base_of(ref: ModelRef) -> ModelRef | None:
    """The model under ``ref``'s adapter (an alias is resolved first), or None for plain weights."""
    from tunesec.models.loading import resolve_alias

    concrete = resolve_alias(ref)
    if concrete.adapter is None:
        return None
    return concrete.model_copy(update={"adapter": None, "provenance": {}})


# -- dense weights -------------------------------------------------------------------------------------------


@dataclass
class DenseModel:
    """A model loaded as plain weights (any adapter merged in), with its tokenizer and ref."""

    ref: ModelRef
    model: Any
    tokenizer: Any
    role: str

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Parameters by name (a tied weight once), as live tensors."""
        return {n: p.data for n, p in self.model.named_parameters()}


def load_dense(ref: ModelRef, *, role: str) -> DenseModel:
    """Load ``ref`` on the CPU in float32 and merge its adapter (PEFT ``merge_and_unload``) into the weights.

    An adapter trained for another base is refused by :func:`~tunesec.models.loading.load_model` (module names
    and shapes are checked against the base before PEFT sees them).
    """
    from tunesec.models.loading import load_model

    try:
        loaded = load_model(ref, device="cpu", dtype="float32")
    except UsageError as err:
        raise UsageError(f"--{role}: {err}") from None
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return DenseModel(ref=ref, model=model, tokenizer=loaded.tokenizer, role=role)


def check_same_shapes(a: DenseModel, b: DenseModel) -> None:
    """Refuse two models of different architectures, parameter names or shapes (one line naming the first)."""
    ta = getattr(a.model.config, "model_type", "?")
    tb = getattr(b.model.config, "model_type", "?")
    if ta != tb:
        raise UsageError(
            f"--{a.role} and --{b.role}: different architectures ({a.role} is {ta}, {b.role} is {tb}); a repair "
            "needs models of one architecture and shape"
        )
    pa, pb = a.params, b.params
    missing = [n for n in pa if n not in pb] or [n for n in pb if n not in pa]
    if missing:
        holder = a.role if missing[0] in pa else b.role
        raise UsageError(
            f"--{a.role} and --{b.role}: parameter '{missing[0]}' is only in {holder}; a repair needs models of one "
            "architecture and shape"
        )
    for name, t in pa.items():
        if tuple(t.shape) != tuple(pb[name].shape):
            raise UsageError(
                f"--{a.role} and --{b.role}: '{name}' has shape {tuple(t.shape)} in {a.role} and "
                f"{tuple(pb[name].shape)} in {b.role}; a repair needs models of one architecture and shape"
            )


def layer_weights(model: Any) -> list[str]:
    """Names of the 2-D weights of the linear layers inside decoder blocks (what SafeLoRA and Antidote edit)."""
    import torch

    names = []
    for qual, mod in model.named_modules():
        if (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D") and _LAYER_RE.search(qual + "."):
            names.append(f"{qual}.weight")
    return names


# -- repairs -------------------------------------------------------------------------------------------------


@dataclass
class RepairInputs:
    """What a repair works on: the tuned model (edited in place), the aligned weights and, when needed, the base."""

    tuned: DenseModel
    aligned: DenseModel
    base: DenseModel | None = None
    notes: list[str] = field(default_factory=list)

    def updated_layers(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, tuned weight, aligned weight) of every decoder-block linear weight the fine-tuning changed."""
        import torch

        tuned, aligned = self.tuned.params, self.aligned.params
        for name in layer_weights(self.tuned.model):
            if name in tuned and not torch.equal(tuned[name], aligned[name]):
                yield name, tuned[name], aligned[name]


class PostRepair:
    """A post-fine-tuning repair: a config and :meth:`apply`, which edits ``inputs.tuned`` in place."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Config]] = Config

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        """Build the repair with a config (instance, mapping of fields, or the defaults)."""
        from tunesec.config import as_config

        self.config = as_config(self.config_class, config, f"repair {self.name}")

    def needs_base(self) -> bool:
        """Whether this repair (with this config) needs the base model the aligned model was aligned from."""
        return False

    def preflight(self, tuned: ModelRef, aligned: ModelRef, notes: list[str]) -> None:
        """Checks (and data loading) before any model is loaded: bad input fails fast. Default: none."""

    def apply(self, inputs: RepairInputs, *, progress: bool = True) -> dict[str, Any]:
        """Edit ``inputs.tuned.model``'s weights; return the report that goes into the provenance."""
        raise NotImplementedError


def repair_entry(name: str) -> Any:
    """The registry entry of repair ``name``; a defense of another stage is a usage error."""
    from tunesec.defenses.base import defense_entry

    return defense_entry(name, stage=STAGE, command="repair")


def get_repair(name: str, config: Config | dict[str, Any] | None = None) -> PostRepair:
    """An instance of repair ``name`` with ``config`` (an instance, a partial mapping, or the defaults)."""
    from tunesec.defenses.base import defense_config

    cls = repair_entry(name).obj
    if config is None or isinstance(config, dict):
        config = defense_config(cls, dict(config or {}), source=f"repair {name} config")
    repair: PostRepair = cls(config)
    return repair


def save_dense(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save weights (safetensors) and tokenizer into ``target`` atomically (temp directory + rename)."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if not any(tmp.glob("*.safetensors")):
        raise RuntimeError(f"{tmp}: save_pretrained wrote no safetensors file")
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def repair(
    name: str,
    *,
    tuned: str | Path | ModelRef,
    aligned: str | Path | ModelRef,
    base: str | Path | ModelRef | None = None,
    overrides: Config | dict[str, Any] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    notes: list[str] | None = None,
) -> Path:
    """Run post-fine-tuning repair ``name`` on ``tuned`` into a new run directory and return that directory.

    The Python form of ``tunesec repair``. The run directory gets ``run.json`` (repair, models, full config)
    first, then the repaired weights (safetensors) in ``model/`` and ``model_ref.json`` (provenance: the repair,
    its config and report, the three models' fingerprints, the weights' sha256). Bad input (a model of another
    architecture or shape, an adapter for another base, a repair that needs a base given none, a defense of
    another stage, an ``out`` that holds a run) raises :class:`UsageError` and leaves no run behind.

    Args:
        name: ``safelora``, ``resta``, ``antidote`` or ``merge-back`` (``tunesec list defenses``).
        tuned: The fine-tuned model (alias, model or adapter directory, or a run directory).
        aligned: The aligned model it was fine-tuned from.
        base: The unaligned base (SafeLoRA, merge-back on flagged layers); default: the model under the aligned
            model's adapter, when it has one.
        overrides: The repair's config, or a partial mapping of its fields.
        out: New or empty run directory (default ``runs/<stamp>-repair-<name>-...``).
        progress: Show progress bars.
        notes: Collects warnings and what the repair did, one line each.

    Example:
        >>> tunesec.repair("safelora", tuned="runs/x", aligned="smollm2-135m-aligned")  # doctest: +SKIP
    """
    from tunesec.attacks.base import write_model_ref
    from tunesec.models.fingerprint import fingerprint
    from tunesec.store.provenance import sha256_file
    from tunesec.store.run import RunDir

    notes = notes if notes is not None else []
    rep = get_repair(name, overrides)
    tuned_ref = resolve_model(tuned, role="tuned")
    aligned_ref = resolve_model(aligned, role="aligned")
    base_ref = resolve_model(base, role="base") if base is not None else None
    if rep.needs_base() and base_ref is None:
        base_ref = base_of(aligned_ref)
        if base_ref is None:
            raise UsageError(
                f"repair {name}: needs the base model the aligned model was aligned from; pass --base "
                f"(aligned {ref_spec(aligned_ref)} is plain weights, so its base is not recorded)"
            )
        notes.append(f"base: {ref_spec(base_ref)} (the model under the aligned model's adapter)")
    spec = {
        "defense": name,
        "stage": STAGE,
        "tuned": ref_spec(tuned_ref),
        "aligned": ref_spec(aligned_ref),
        "base": ref_spec(base_ref) if base_ref is not None else None,
        "config": rep.config.model_dump(mode="json"),
    }
    run = RunDir.create("repair", f"{name}-{tuned_ref.name}", spec, out=Path(out) if out is not None else None)
    started = time.perf_counter()
    try:
        rep.preflight(tuned_ref, aligned_ref, notes)
        t_model = load_dense(tuned_ref, role="tuned")
        a_model = load_dense(aligned_ref, role="aligned")
        check_same_shapes(t_model, a_model)
        b_model = None
        if base_ref is not None and rep.needs_base():
            b_model = load_dense(base_ref, role="base")
            check_same_shapes(a_model, b_model)
        inputs = RepairInputs(tuned=t_model, aligned=a_model, base=b_model, notes=notes)
        if not any(True for _ in inputs.updated_layers()):
            notes.append("the tuned model's decoder-block weights equal the aligned model's: nothing was fine-tuned")
        loaded_s = time.perf_counter() - started
        report = rep.apply(inputs, progress=progress)
    except UsageError:
        run.discard()  # only run.json was written: leave nothing behind
        raise
    model_dir = save_dense(t_model.model, t_model.tokenizer, run.path / "model")
    seconds = time.perf_counter() - started
    provenance: dict[str, Any] = {
        "defense": name,
        "stage": STAGE,
        "config": rep.config.model_dump(mode="json"),
        "report": report,
        "tuned": fingerprint(tuned_ref),
        "aligned": fingerprint(aligned_ref),
        **({"base": fingerprint(base_ref)} if base_ref is not None else {}),
        "seconds": {"total": round(seconds, 2), "load": round(loaded_s, 2)},
        "weights_sha256": {p.name: sha256_file(p) for p in sorted(model_dir.glob("*.safetensors"))},
        "parent": tuned_ref.spec(),
        "notes": list(notes),
    }
    ref = ModelRef(base=str(model_dir.resolve()), kind="hf", provenance=provenance)
    write_model_ref(run.path, ref)
    run.finish(model=ref.model_dump(mode="json"))
    return run.path
