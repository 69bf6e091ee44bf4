"""Load models securely: safetensors only, no remote code, checked adapters, GGUF dequantized to fp32.

Every path ends in :func:`load_model`, which takes a spec string or a :class:`ModelRef` and returns a
:class:`LoadedModel` (model in eval mode + tokenizer with a pad token). Pickle weights (``.bin``, ``.pt``) are
refused unless ``allow_pickle=True``; ``trust_remote_code`` is off unless asked.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    """A model ready for generation or training, with its tokenizer and the ref it came from."""

    ref: ModelRef
    model: Any
    tokenizer: Any

    @property
    def device(self) -> Any:
        """The device of the model's first parameter."""
        return next(self.model.parameters()).device


def load_model(
    spec: str | ModelRef,
    *,
    base: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: Alias, local directory, ``.gguf`` file, adapter directory or hub id (see :class:`ModelRef`).
        base: Base model for an adapter directory, overriding the adapter's own record.
        allow_pickle: Accept pickle-based weight files (``.bin``/``.pt``); they can execute code when loaded.
        trust_remote_code: Run modelling code shipped with a hub model. Off by default.
        dtype: ``float32`` (default; what a CPU wants), ``bfloat16``, ``float16`` or ``auto``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:N]``.
    """
    ref = ModelRef.parse(spec, base=base) if isinstance(spec, str) else spec
    if ref.is_endpoint:
        raise UsageError(f"model {ref.base!r}: an API endpoint has no weights to load; use it for evaluation only")
    resolved = resolve_alias(ref)
    model, tokenizer = _load_base(resolved, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype)
    if resolved.adapter is not None:
        model = _attach_adapter(model, Path(resolved.adapter), resolved, allow_pickle=allow_pickle)
    _prepare_tokenizer(tokenizer)
    target = _device(device)
    if str(target) != "cpu":
        model = model.to(target)
    model.eval()
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer)


def resolve_alias(ref: ModelRef) -> ModelRef:
    """Turn an alias ref into a concrete one (materialising caches); other refs are returned unchanged."""
    if ref.kind != "alias":
        return ref
    from tunesec.registry import registry

    concrete: ModelRef = registry.get("model", ref.base).obj()
    if ref.adapter is not None:
        if concrete.adapter is not None:
            raise UsageError(f"{ref.base}: alias already carries an adapter; cannot stack {ref.adapter}")
        concrete = concrete.model_copy(update={"adapter": ref.adapter})
    return concrete


# -- base weights --------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str) -> Any:
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if dtype not in table:
        raise UsageError(f"dtype {dtype!r}: expected one of {', '.join(table)}")
    return table[dtype]


def _device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"device {device!r}: expected auto, cpu or cuda[:N]") from None


def _load_base(ref: ModelRef, *, allow_pickle: bool, trust_remote_code: bool, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    if ref.kind == "gguf":
        path = Path(ref.base)
        check_gguf(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch_dtype if dtype != "auto" else None
            )
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise UsageError(f"{path}: cannot load GGUF: {_first_line(err)}") from None
        clear_quantization_markers(model)
        return model, tokenizer

    source = ref.base
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    if Path(source).is_dir():
        _check_weight_files(Path(source), allow_pickle)
    else:
        kwargs["use_safetensors"] = None if allow_pickle else True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "use_safetensors"})
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"{source}: cannot load model: {_first_line(err)}") from None
    return model, tokenizer


def _check_weight_files(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        if allow_pickle:
            return
        raise UsageError(
            f"{path}: only pickle weights ({pickles[0]}); pickle can run code when loaded. Convert to safetensors "
            "or pass --allow-pickle if you trust the file"
        )
    raise UsageError(f"{path}: no weights found (expected *.safetensors)")


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF (bad magic, truncated tensor data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as err:
        raise UsageError(f"{path}: cannot read GGUF ({err.strerror})") from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise UsageError(f"{path}: not a GGUF file (bad magic bytes); expected a .gguf model file")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise UsageError(f"{path}: unsupported GGUF version {version}; expected 2 or 3")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, struct.error, OSError) as err:
        raise UsageError(f"{path}: corrupt or truncated GGUF ({_first_line(err)})") from None
    if end > size:
        raise UsageError(f"{path}: truncated GGUF (tensor data ends at byte {end}, file has {size})")


def clear_quantization_markers(model: Any) -> None:
    """Forget that a model came from GGUF: its weights are already dequantized fp32 tensors.

    transformers keeps a GGUF quantizer on the model and refuses ``save_pretrained`` (and some training paths)
    while it is set, though nothing is quantized any more.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "_is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("_is_quantized",):
        if hasattr(model.config, attr):
            setattr(model.config, attr, False)
    if hasattr(model, "quantization_method"):
        model.quantization_method = None


# -- adapters ------------------------------------------------------------------------------------------------


def _attach_adapter(model: Any, adapter_dir: Path, ref: ModelRef, *, allow_pickle: bool) -> Any:
    from peft import PeftModel

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file() and not allow_pickle:
            raise UsageError(
                f"{adapter_dir}: adapter weights are pickle (adapter_model.bin); pass --allow-pickle if you trust them"
            )
        if not (adapter_dir / "adapter_model.bin").is_file():
            raise UsageError(f"{adapter_dir}: missing adapter weights (adapter_model.safetensors)")
    else:
        check_adapter_matches(model, adapter_dir, base_name=ref.base)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UsageError(f"{adapter_dir}: adapter does not fit base {ref.name}: {_first_line(err)}") from None


def check_adapter_matches(model: Any, adapter_dir: Path, *, base_name: str = "base") -> None:
    """Check every LoRA matrix in an adapter against the base module it targets (names and shapes).

    A clear :class:`UsageError` names the first module that is missing or has other dimensions, which is what an
    adapter trained for another base looks like.
    """
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        if not keys:
            raise UsageError(f"{adapter_dir}: adapter has no tensors")
        for key in keys:
            shape = tuple(fh.get_slice(key).get_shape())
            target, kind = _lora_target(key)
            if target is None:
                continue
            module = modules.get(target)
            if module is None:
                raise UsageError(
                    f"{adapter_dir}: adapter for another base: module '{target}' does not exist in {base_name}"
                )
            in_f = getattr(module, "in_features", None)
            out_f = getattr(module, "out_features", None)
            if in_f is None or out_f is None:
                weight = getattr(module, "weight", None)
                if weight is None or weight.dim() != 2:
                    continue
                out_f, in_f = weight.shape
            expected = in_f if kind == "A" else out_f
            got = shape[1] if kind == "A" else shape[0]
            if got != expected:
                raise UsageError(
                    f"{adapter_dir}: adapter for another base: '{target}' expects "
                    f"{'input' if kind == 'A' else 'output'} size {expected} in {base_name}, adapter has {got}"
                )


def _lora_target(key: str) -> tuple[str | None, str]:
    """Map ``base_model.model.X.lora_A.weight`` to (``X``, ``A``)."""
    for kind in ("A", "B"):
        marker = f".lora_{kind}."
        if marker in key:
            name = key.split(marker)[0]
            name = name.removeprefix("base_model.model.")
            return name, kind
    return None, ""


def adapter_base_name(adapter_dir: Path) -> str | None:
    """The base recorded in an adapter's config."""
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None


# -- tokenizer -----------------------------------------------------------------------------------------------


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
