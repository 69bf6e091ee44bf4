"""Tiny random causal LMs and a byte-level BPE tokenizer, built inside tests (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I kill a Python process? Use the kill command with its process id.",
    "Write a poem about the sea and the sky.",
    "I'm sorry, but I cannot help with that request.",
    "Sure, here is how to bake bread: mix flour, water, salt and yeast.",
    "What is the capital of France? Paris is the capital of France.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar.",
    "user assistant system hello world 0 1 2 3 4 5 6 7 8 9",
]


def make_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def make_model(tokenizer: Any, arch: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A tiny random Llama- or Qwen2-style causal LM (weights scaled up so greedy choices are decisive)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
        "initializer_range": 0.2,
    }
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    model.eval()
    return model


def save_tiny(path: Path, arch: str = "llama", hidden: int = 64, seed: int = 0, safe: bool = True) -> Path:
    """Build a tiny model + tokenizer and save them as a local Hugging Face directory."""
    tok = make_tokenizer()
    model = make_model(tok, arch=arch, hidden=hidden, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    if not safe:  # a legacy pickle checkpoint, as old hub repos ship
        import torch

        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tok.save_pretrained(str(path))
    return path
