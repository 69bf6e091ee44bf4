"""Checks before training starts: GGUF markers, a memory estimate, the trainable-parameter count.

torch and psutil are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesec.errors import UsageError
from tunesec.training.collate import Encoded
from tunesec.training.config import TrainConfig


def trainable_count(model: Any, config: TrainConfig, targets: list[str]) -> int:
    """Parameters training will update (counted before LoRA is applied, so nothing is changed yet)."""
    if config.method == "full":
        return sum(p.numel() for p in model.parameters() if p.is_floating_point())
    if hasattr(model, "peft_config"):
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = 0
    for qual, mod in model.named_modules():
        if qual.rsplit(".", 1)[-1] in targets and hasattr(mod, "weight") and getattr(mod, "weight", None) is not None:
            rows, cols = mod.weight.shape[0], mod.weight.shape[-1]
            total += config.lora_r * (rows + cols)
    return total


def drop_gguf_markers(model: Any) -> None:
    """A model loaded from GGUF and dequantized is plain float weights: clear the quantization markers.

    transformers 5 attaches a ``GgufHfQuantizer`` and ``config.quantization_config`` to such a model, which
    makes ``Trainer`` refuse full fine-tuning and ``save_pretrained`` record a quantization it no longer has.
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(qc, "quant_method", None) or (qc.get("quant_method") if isinstance(qc, dict) else None)
    if "gguf" not in str(method).lower() and "gguf" not in type(quantizer).__name__.lower():
        return
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise UsageError(
            f"model: GGUF weights are still packed (e.g. {packed[0]}); load the model dequantized to fine-tune it"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def check_memory(model: Any, config: TrainConfig, encoded: Sequence[Encoded], trainable: int) -> None:
    """Refuse to start when a rough estimate of the extra memory training needs exceeds what is free."""
    import psutil
    import torch

    need = training_memory(model, config, encoded, trainable)
    device = next(model.parameters()).device
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
    else:
        free = int(psutil.virtual_memory().available)
    if need > free:
        raise UsageError(
            f"training: needs about {need / 2**30:.1f} GiB more memory than the {free / 2**30:.1f} GiB free on "
            f"{device.type}; lower per_device_batch_size or max_seq_len, use method 'lora', or turn on "
            "gradient_checkpointing (or set check_memory: false)"
        )


def training_memory(model: Any, config: TrainConfig, encoded: Sequence[Encoded], trainable: int) -> int:
    """A rough estimate, in bytes, of the memory training needs beyond the loaded model."""
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    lengths = sorted((len(e.input_ids) for e in encoded), reverse=True)
    tokens = sum(lengths[: config.per_device_batch_size])
    if config.batching != "padding-free":
        tokens = lengths[0] * min(config.per_device_batch_size, len(lengths))
    label_tokens = min(tokens, max(e.n_label_tokens for e in encoded) * config.per_device_batch_size)
    # fp32 gradient + two AdamW moments per trainable weight; ~(10 hidden + 3 intermediate) floats saved per
    # token and layer for the backward pass (1 per layer with checkpointing); logits, softmax and grad.
    per_token_layer = hidden + 1 if config.gradient_checkpointing else 10 * hidden + 3 * inter
    return int(12 * trainable + 4 * tokens * layers * per_token_layer + 12 * label_tokens * vocab)
