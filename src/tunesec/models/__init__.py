"""Models: references, secure loading, chat formatting and generation backends."""

from __future__ import annotations

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
    if backend in ("auto", "vllm") and ref.adapter is None and _vllm_usable():
        from tunesec.models.generation import VLLMGenerator
        from tunesec.models.loading import resolve_alias

        concrete = resolve_alias(ref)
        if concrete.kind == "hf" and concrete.adapter is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(concrete.base, trust_remote_code=trust_remote_code)
            return VLLMGenerator(concrete.base, tok, ref.name, trust_remote_code=trust_remote_code)
    elif backend == "vllm":
        from tunesec.errors import UsageError

        raise UsageError("backend vllm: needs `pip install tunesec[vllm]` and a CUDA GPU")
    loaded = load_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **load_kwargs)
    return HFGenerator(loaded, max_batch_size=max_batch_size)


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())
