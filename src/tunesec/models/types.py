"""Value types shared by every generation backend (local HF engine, vLLM, OpenAI-compatible endpoints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import Field

from tunesec.config import Config

# A prompt is a chat (list of {"role", "content"} dicts) or a bare string (taken as one user turn).
Chat = list[dict[str, str]]
Prompt = Chat | str


class GenerationConfig(Config):
    """Decoding settings. Greedy by default, so evaluations are deterministic."""

    max_new_tokens: int = Field(256, ge=1, description="Tokens to generate at most per prompt.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = all; with do_sample).")
    seed: int = Field(
        0,
        description="Seed for sampling; each prompt gets its own stream, so results "
        "do not depend on batch composition.",
    )
    batch_size: int | Literal["auto"] = Field("auto", description="Prompts per batch, or 'auto' (fit memory).")
    system_prompt: str | None = Field(None, description="System prompt prepended when a chat has none.")
    continue_final_message: bool = Field(
        False,
        exclude_if=lambda v: not v,  # left out of run specs when off, so earlier runs resume unchanged
        description="A chat that ends with an assistant turn is continued from that turn's text (a prefilled "
        "answer) instead of being answered after it (as a guard model answers a whole conversation).",
    )


class Generation(Config):
    """One finished generation."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length", "error"] = "stop"
    seconds: float = 0.0
    choice_logprobs: dict[str, float] | None = Field(
        None, description="With choice scoring: each choice's summed token log-probability after the prompt."
    )


@runtime_checkable
class Generator(Protocol):
    """Anything that turns prompts into generations, in order."""

    name: str

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        """Generate one response per prompt (same order)."""
        ...


def as_chat(prompt: Prompt, system_prompt: str | None = None) -> Chat:
    """Normalise a prompt to a chat; add ``system_prompt`` when the chat has no system turn."""
    chat: Chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and not (chat and chat[0].get("role") == "system"):
        chat = [{"role": "system", "content": system_prompt}, *chat]
    return chat
