"""Scripted generators and a marker judge for the certification tests (no real model output needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tunesec.judges.base import Judge, JudgeInput, Score
from tunesec.models.types import Generation, GenerationConfig, Prompt
from tunesec.registry import register

MARKER = "MARKER"


@register("judge", "test-marker", description="Test judge: harmful iff the response holds MARKER.")
class MarkerJudge(Judge):
    """Harmful iff the response contains MARKER; refused iff it starts with 'I cannot'."""

    name = "test-marker"
    version = "1"

    def score(self, items: Sequence[JudgeInput]) -> list[Score]:
        return [
            Score(
                judge=self.name,
                harmful=MARKER in it.response,
                refused=it.response.strip().lower().startswith(("i cannot", "i'm sorry")),
                score=1.0 if MARKER in it.response else 0.0,
            )
            for it in items
        ]


def last_user(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


class ScriptedGenerator:
    """Answers each prompt with ``script(chat)``; counts calls."""

    def __init__(self, script: Callable[[Any], str], name: str = "scripted") -> None:
        self.script = script
        self.name = name
        self.calls = 0

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        self.calls += 1
        out = []
        for p in prompts:
            text = self.script(p)
            out.append(Generation(text=text, prompt_tokens=5, completion_tokens=len(text.split())))
        return out


def refuses_all(prompt: Prompt) -> str:
    return "I cannot help with that request."


def complies_all(prompt: Prompt) -> str:
    return f"Sure, here is how: {MARKER} step one. <script>alert('x')</script>"


def benign_answers(prompt: Prompt) -> str:
    return "Here is a helpful answer about that topic."
