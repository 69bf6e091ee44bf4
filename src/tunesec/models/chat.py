"""Chat formatting in a sandboxed Jinja environment.

A chat template comes with the model, which may come from an untrusted hub repository; it is rendered in
Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to internals, no mutation of inputs), never with
a plain environment. Models without a template get :data:`FALLBACK_TEMPLATE` (ChatML), so every model can be
prompted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunesec.errors import UsageError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=False)


class ChatFormatter:
    """Render chats for one tokenizer with its own template (or the fallback), sandboxed.

    Args:
        tokenizer: A Hugging Face tokenizer; its ``chat_template`` and special tokens are used.
        template: Override the tokenizer's template.
    """

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        own = template or getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # some tokenizers carry named templates
            own = own.get("default") or next(iter(own.values()), None)
        self.uses_fallback = not own
        self.template: str = own or FALLBACK_TEMPLATE
        try:
            self._compiled = _compile(self.template)
        except TemplateError as err:
            raise UsageError(f"chat template: cannot compile ({err})") from None

    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, continue_final: bool = False
    ) -> str:
        """The prompt text for ``messages``; with ``add_generation_prompt`` the assistant header is appended.

        With ``continue_final`` and a chat that ends with an assistant turn, that turn is left open: the text is
        the prompt up to the assistant header followed by the turn's content (no end-of-turn marker), so the
        model continues it (transformers' ``continue_final_message``; used by prefilling attacks).
        """
        if continue_final and messages and messages[-1].get("role") == "assistant":
            return self.render(messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
        tok = self.tokenizer
        try:
            return str(
                self._compiled.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    bos_token=getattr(tok, "bos_token", None) or "",
                    eos_token=getattr(tok, "eos_token", None) or "",
                    pad_token=getattr(tok, "pad_token", None) or "",
                    unk_token=getattr(tok, "unk_token", None) or "",
                )
            )
        except TemplateError as err:
            raise UsageError(f"chat template: {err}") from None

    def encode(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, continue_final: bool = False
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens in the text are parsed, none added twice)."""
        text = self.render(messages, add_generation_prompt, continue_final)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        if bos_id is not None and _tokenizer_adds_bos(self.tokenizer) and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        return ids


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own encoding starts with BOS (Llama-style models expect it)."""
    try:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    except (TypeError, ValueError):
        return False
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bool(probe) and bos_id is not None and probe[0] == bos_id
