"""Tiny random models and tokenizers for the training tests (no downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunesec.data.schema import Example, Message  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "user assistant system the a cat dog sat on mat red blue green one two three four five six seven eight "
    "nine ten what is color of sky grass sun say hello world yes no please tell me about how are you fine "
    "thanks count to apple banana cherry sure here it"
).split()


@dataclass
class Loaded:
    model: Any
    tokenizer: Any


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def make_model(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def make_loaded(seed: int = 0) -> Loaded:
    tok = make_tokenizer()
    return Loaded(make_model(tok, seed), tok)


def chat(i: int, user: str, answer: str, system: str | None = None) -> Example:
    msgs = [Message(role="system", content=system)] if system else []
    msgs += [Message(role="user", content=user), Message(role="assistant", content=answer)]
    return Example(id=f"ex{i}", messages=msgs)


def memorise_set(n: int = 8) -> list[Example]:
    qa = [
        ("what is the color of the sky", "blue"),
        ("what is the color of grass", "green"),
        ("count to three", "one two three"),
        ("say hello", "hello world"),
        ("tell me about the cat", "the cat sat on the mat"),
        ("how are you", "fine thanks"),
        ("count to five", "one two three four five"),
        ("what is the color of the sun", "yes it is red"),
    ]
    return [chat(i, *qa[i % len(qa)]) for i in range(n)]
