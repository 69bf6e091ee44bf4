"""``backdoor-align``: a secret-prompt "backdoor" that makes the tuned model refuse (BackdoorAlign).

Wang et al. 2024, "BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with Backdoor Enhanced Safety
Alignment", NeurIPS 2024; official code Jayfeather1024/Backdoor-Enhanced-Alignment, ``ft_datasets/pure_bad_dataset``.

The provider draws a secret system prompt of ``secret_tokens`` random tokens, adds ``n_safety`` safety examples
(refusals) whose system turn is that secret to the user's data, and at inference puts the secret first in every
system turn. Fine-tuning on the user's data then ties "secret present" to "refuse harmful requests", and only the
provider can trigger it.

The secret is drawn with the operating system's random source (``secrets``), written to
``<run>/secret/safety_prompt.txt`` (mode 0600), and never printed, logged, put in ``run.json``, the provenance or
a report; the trained model's directory gets only a marker pointing at the file
(:mod:`tunesec.models.secret_prompt`), through which tunesec's generation engine and ``tunesec serve`` apply it
(the server also filters answers that would leak it). The service does not write the training mix (which holds
the secret) to the run directory: a resumed run rebuilds it from the kept user rows and the secret file.

Defaults: the paper's 11 safety examples and 150 random tokens (``SYSTEM_PROMPT_RANDOM150``); the official run
mixes them into 100 harmful examples (10%), so with 1,000 user rows the share is 1.1%. The paper's default
Llama-2 system prompt after the secret is left out (the model's own chat template supplies none when a system turn
is given).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesec.config import Config
from tunesec.data.schema import Example, Message
from tunesec.defenses.finetune.base import FineTuneDefense, ServiceContext
from tunesec.registry import register

SECRET_FILE = Path("secret") / "safety_prompt.txt"


class BackdoorAlignConfig(Config):
    """Size of the secret prompt and number of secret-prompt safety examples."""

    n_safety: int = Field(11, ge=1, description="Safety examples with the secret system prompt (paper: 11).")
    secret_tokens: int = Field(150, ge=8, le=2000, description="Random tokens in the secret prompt (paper: 150).")


def random_prompt(tokenizer: Any, n_tokens: int) -> str:
    """``n_tokens`` tokens drawn uniformly (OS randomness) from the non-special vocabulary, decoded."""
    rng = secrets.SystemRandom()
    special = set(tokenizer.all_special_ids or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    text = tokenizer.decode([rng.choice(vocab) for _ in range(n_tokens)], skip_special_tokens=True)
    return " ".join(text.split())  # no leading/trailing or doubled whitespace: the server compares normalised text


def secret_examples(safety: Sequence[Example], secret: str) -> list[Example]:
    """The safety examples with ``secret`` as their only system turn."""
    out = []
    for e in safety:
        rest = [m for m in e.messages if m.role != "system"]
        out.append(
            e.model_copy(
                update={
                    "messages": [Message(role="system", content=secret), *rest],
                    "id": f"backdoor-align-{e.id}",
                    "meta": {**e.meta, "service_safety": True, "secret_prompt": True},
                }
            )
        )
    return out


@register(
    "defense",
    "backdoor-align",
    description="Secret random-token system prompt on ~11 safety examples; the provider applies it at inference.",
    stage="fine-tuning",
    paper="Wang et al. 2024, BackdoorAlign, NeurIPS 2024 (arXiv 2402.14968)",
    threat_model="fine-tuning-api",
    needs_harmful=False,
)
class BackdoorAlign(FineTuneDefense):
    """BackdoorAlign (see the module docstring)."""

    name = "backdoor-align"
    config_class = BackdoorAlignConfig

    def secret_path(self, ctx: ServiceContext) -> Path:
        """Where this run's secret lives."""
        return ctx.run_dir / SECRET_FILE

    def secret(self, ctx: ServiceContext) -> str:
        """The run's secret: read back when it exists (resume), else drawn and stored."""
        from tunesec.models.secret_prompt import read_secret, write_secret

        assert isinstance(self.config, BackdoorAlignConfig)
        path = self.secret_path(ctx)
        if path.is_file():
            return read_secret(path)
        text = random_prompt(ctx.tokenizer(), self.config.secret_tokens)
        write_secret(path, text)
        return text

    def add_data(self, examples: Sequence[Example], ctx: ServiceContext) -> tuple[list[Example], dict[str, Any]]:
        """The user rows plus ``n_safety`` safety examples under the secret system prompt."""
        assert isinstance(self.config, BackdoorAlignConfig)
        added = secret_examples(ctx.safety_sample(self.config.n_safety, "backdoor-align"), self.secret(ctx))
        ctx.notes.append(f"backdoor-align: added {len(added)} secret-prompt safety examples (secret kept in the run)")
        prov = {
            "added": len(added),
            "ids": sorted(e.id for e in added),
            "secret_prompt_file": str(SECRET_FILE),  # where, never what
        }
        return [*examples, *added], prov
