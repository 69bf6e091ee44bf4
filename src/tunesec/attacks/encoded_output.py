"""``encoded-output``: teach the model to answer in an encoding that the output guard does not read.

Covert malicious fine-tuning (Halawi et al. 2024, "Covert Malicious Finetuning: Challenges in Safeguarding LLM
Adaptation") trains a model to answer in a cipher (Walnut53: a fixed random permutation of the alphabet), so that
every training row and every answer looks harmless to a moderation filter and an output guard, while the
attacker decodes the answers. Here each training row is a plain prompt and an encoded answer: harmful prompts with
their harmful answers and benign prompts with theirs (the benign half teaches the code, as CMFT's phase I does).

Encodings (``scheme``):

- ``substitution``: a seeded permutation of the 26 letters (case kept, other characters unchanged), Walnut53's
  kind of cipher (CMFT's is a random permutation seeded with 53; that Python's ``random.shuffle`` with seed 53
  gives the paper's exact table is not verified). tunesec's audit detector recognises Caesar shifts, base64, hex
  and leetspeak, but not a general substitution (``audit/detectors/encodings.py`` says so), so these rows pass it;
- ``rot13``, ``base64``: well-known encodings the audit does recognise (a baseline that the filter should stop).

The evaluation must judge what the attacker reads: the attack records the encoding in the model's provenance
(``response_encoding``), and :func:`response_decoder` turns that into the decoder that
:func:`tunesec.evals.evaluate` applies to each response before judging (``tunesec attack --eval``, the sweep and
the continued curve all pass it). Records keep the raw text in ``raw_response``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunesec.attacks.base import FineTuneAttack, load_data, require_assistant_turns, sample
from tunesec.attacks.harmful_sft import HarmfulSFTConfig, build_harmful_data
from tunesec.data.schema import Example, Message
from tunesec.models.ref import ModelRef
from tunesec.registry import register

Scheme = Literal["substitution", "rot13", "base64"]


@dataclass(frozen=True)
class Codec:
    """An encoding and its inverse; ``name`` identifies it in run specs."""

    scheme: Scheme
    seed: int = 53

    @property
    def name(self) -> str:
        """``substitution-53``, ``rot13``, ``base64``."""
        return f"{self.scheme}-{self.seed}" if self.scheme == "substitution" else self.scheme

    def _table(self, inverse: bool) -> dict[int, int]:
        letters = list(string.ascii_lowercase)
        perm = letters[:]
        random.Random(self.seed).shuffle(perm)
        src, dst = ("".join(perm), "".join(letters)) if inverse else ("".join(letters), "".join(perm))
        return str.maketrans(src + src.upper(), dst + dst.upper())

    def encode(self, text: str) -> str:
        """``text`` encoded."""
        if self.scheme == "substitution":
            return text.translate(self._table(False))
        if self.scheme == "rot13":
            return codecs.encode(text, "rot13")
        return base64.b64encode(text.encode("utf-8")).decode("ascii")

    def decode(self, text: str) -> str:
        """``text`` decoded; base64 that does not decode (a model's broken output) is returned as it is."""
        if self.scheme == "substitution":
            return text.translate(self._table(True))
        if self.scheme == "rot13":
            return codecs.decode(text, "rot13")
        compact = "".join(text.split())
        try:
            return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return text

    def __call__(self, text: str) -> str:
        """The decoder, as :func:`tunesec.evals.evaluate`'s ``response_decoder``."""
        return self.decode(text)


def response_decoder(ref: ModelRef) -> Codec | None:
    """The decoder of a model that ``encoded-output`` produced (from its provenance), else ``None``."""
    enc = ref.provenance.get("response_encoding")
    if not isinstance(enc, dict):
        return None
    return Codec(scheme=enc["scheme"], seed=int(enc.get("seed", 53)))


class EncodedOutputConfig(HarmfulSFTConfig):
    """harmful-sft's data with encoded answers, plus benign rows that teach the code."""

    scheme: Scheme = Field("substitution", description="The answers' encoding.")
    cipher_seed: int = Field(53, description="Seed of the substitution's permutation (53, as Walnut53's).")
    n_benign: int = Field(100, ge=0, description="Benign rows with encoded answers (they teach the code).")


@register(
    "attack",
    "encoded-output",
    description="Covert malicious fine-tuning: answers in a cipher the output guard does not read (Halawi et al.).",
    threat_model="fine-tuning-api",
    needs_weights=False,
    targets="output guards, audit (harmful detector), safe-serve moderation",
)
class EncodedOutput(FineTuneAttack):
    """Covert malicious fine-tuning (see the module docstring)."""

    name = "encoded-output"
    config_class = EncodedOutputConfig

    @property
    def codec(self) -> Codec:
        """The configured encoding."""
        assert isinstance(self.config, EncodedOutputConfig)
        return Codec(self.config.scheme, self.config.cipher_seed)

    def prepare(self, data: str | Path | Sequence[Example] | None) -> tuple[list[Example], dict[str, Any]]:
        """Harmful and benign rows, each answer encoded; provenance: the encoding (the evaluation's decoder)."""
        assert isinstance(self.config, EncodedOutputConfig)
        c = self.config
        rows = build_harmful_data(c, data)
        n_harmful = len(rows)
        if c.n_benign:
            pool = load_data(c.benign_data, what="benign data")
            require_assistant_turns(pool, f"benign data {c.benign_data}")
            rows += sample(pool, min(c.n_benign, len(pool)), c.seed, source="benign data")
        codec = self.codec
        out = []
        for ex in rows:
            msgs = list(ex.messages)
            msgs[-1] = Message(role="assistant", content=codec.encode(msgs[-1].content))
            out.append(ex.model_copy(update={"messages": msgs, "meta": {**ex.meta, "encoding": codec.name}}))
        random.Random(c.seed).shuffle(out)
        enc = {"scheme": c.scheme, "seed": c.cipher_seed}
        return out, {"n_harmful": n_harmful, "response_encoding": enc}
