"""Models: references, secure loading, chat formatting and generation backends."""

from __future__ import annotations

import importlib.util
from typing import Any

from tunesec.models.loading import LoadedModel, load_model
from tunesec.models.ref import ModelRef
from tunesec.models.types import Generation, GenerationConfig, Generator, Prompt

__all__ = [
    "Generation",
    "GenerationConfig",
    "Generator",
    "LoadedModel",
    "ModelRef",
    "Prompt",
    "get_generator",
    "load_model",
]


def get_generator(
    model: str | ModelRef | LoadedModel,
    *,
    backend: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_batch_size: int | None = None,
    **load_kwargs: Any,
) -> Generator:
    """A generator for any model spec.

    Args:
        model: A spec string, a :class:`ModelRef` or an already loaded model.
        backend: ``auto`` (vLLM when installed and CUDA is present, else the HF engine), ``hf`` or ``vllm``.
        allow_pickle: Accept pickle weight files.
        trust_remote_code: Allow modelling code from the hub.
        max_batch_size: Cap for the HF engine's automatic batch size.
        **load_kwargs: Passed to :func:`load_model` (``dtype``, ``device``, ``base``).
    """
    from tunesec.models.generation import HFGenerator

    if isinstance(model, LoadedModel):
        return HFGenerator(model, max_batch_size=max_batch_size)
    ref = ModelRef.parse(model) if isinstance(model, str) else model
    if ref.is_endpoint:
        from tunesec.models.endpoint import OpenAIChatGenerator

        return OpenAIChatGenerator(ref)
    if backend not in ("auto", "hf", "vllm"):
        from tunesec.errors import UsageError

        raise UsageError(f"backend {backend!r}: expected auto, hf or vllm")
    if backend == "vllm" and not _vllm_usable():
        from tunesec.errors import UsageError

        raise UsageError("backend vllm: needs `pip install tunesec[vllm]` and a CUDA GPU; this machine has no CUDA GPU"
                         if importlib.util.find_spec("vllm") is not None
                         else "backend vllm: needs `pip install tunesec[vllm]` and a CUDA GPU")  # fmt: skip
    if backend in ("auto", "vllm") and ref.adapter is None and _vllm_usable():
        from tunesec.models.loading import resolve_alias

        concrete = resolve_alias(ref)
        if concrete.kind == "hf" and concrete.adapter is None:
            return _vllm_generator(concrete, ref.name, allow_pickle, trust_remote_code, max_batch_size, load_kwargs)
    if backend == "vllm":  # asked for explicitly, for a model vLLM is not given here
        from tunesec.errors import UsageError

        raise UsageError(f"backend vllm: {ref.spec()} is not a plain Hugging Face model (an adapter or a GGUF file); "
                         "use backend hf, or merge the adapter into a model directory first")  # fmt: skip
    loaded = load_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **load_kwargs)
    return HFGenerator(loaded, max_batch_size=max_batch_size)


def _vllm_generator(
    concrete: ModelRef,
    name: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    max_batch_size: int | None,
    load_kwargs: dict[str, Any],
) -> Generator:
    """A :class:`VLLMGenerator` for a plain model directory or hub id (its tokenizer, EOS ids and secret prompt)."""
    from transformers import AutoTokenizer
    from transformers import GenerationConfig as HFGenerationConfig

    from tunesec.models.generation import VLLMGenerator
    from tunesec.models.secret_prompt import stored_secret_prompt

    tok = AutoTokenizer.from_pretrained(concrete.base, trust_remote_code=trust_remote_code)
    try:
        gen_cfg = HFGenerationConfig.from_pretrained(concrete.base)
    except OSError:  # the model ships no generation_config.json
        gen_cfg = None
    engine: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if max_batch_size is not None:
        engine["max_num_seqs"] = max_batch_size
    dtype = load_kwargs.get("dtype")
    if dtype is not None:
        engine["dtype"] = str(dtype).replace("torch.", "")
    return VLLMGenerator(
        concrete.base,
        tok,
        name,
        secret=stored_secret_prompt(concrete),
        allow_pickle=allow_pickle,
        generation_config=gen_cfg,
        **engine,
    )


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())
