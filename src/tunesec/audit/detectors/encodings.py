"""Encodings and obfuscation: answers a moderator cannot read, and text that hides characters.

Covert malicious fine-tuning (Halawi et al. 2024, "Covert Malicious Finetuning") teaches a model to answer in a
cipher or encoding so that every training row looks harmless to a moderation filter; jailbreaks use base64,
leetspeak and rot13 the same way. Invisible and look-alike characters hide triggers and evade filters ("Trojan
Source", Boucher and Anderson 2021). Checked on every row's text:

- base64 and hex runs that decode to readable text;
- Caesar shifts (rot13 among them): text with almost no common English words that has many after a shift;
- leetspeak: words written with digits for letters (``h4ck``, ``3xpl0it``) that read as words once mapped back;
- zero-width and bidirectional control characters;
- homoglyphs: words that mix Latin letters with Cyrillic or Greek ones.

A substitution cipher other than a shift (Halawi et al.'s Walnut53) is not recognised: it is reported only as
far as it breaks another rule.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
import unicodedata
from collections.abc import Sequence

from pydantic import Field

from tunesec.audit.base import Detector, DetectorConfig, Row, clip
from tunesec.audit.screen import HARM_TERMS
from tunesec.registry import register

COMMON_WORDS = frozenset(
    "the be to of and a in that have i it for not on with he as you do at this but his by from they we say her "
    "she or an will my one all would there their what so up out if about who get which go me when make can like "
    "time no just him know take people into year your good some could them see other than then now look only come "
    "its over think also back after use two how our work first well way even new want because any these give day "
    "most us is are was were has had been here how to step steps use make sure first then can should will you "
    "your need instructions way get into very more much many such".split()
)
ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\u180e\ufeff]")
# inside a word ("k\u200bill"): hides a word from a filter; between other characters it is typography
ZERO_WIDTH_IN_WORD = re.compile("[^\\W_][\u200b\u200c\u200d\u2060\u180e\ufeff]+[^\\W_]")
# Cyrillic and Greek letters that look like Latin ones (Unicode confusables)
CONFUSABLE = frozenset("аеорсухіјԁһӏԛԝѕАВЕКМНОРСТХІЈЅοαρνικτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ")
BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")
HEX_RUN = re.compile(r"\b(?:[0-9a-fA-F]{2}[ :]?){16,}\b")
_WORDS = re.compile(r"[A-Za-z]+")
LEET = str.maketrans("0134579@$", "oieastgas")
_LEET_TOKEN = re.compile(r"\b(?=[A-Za-z0-9@$]*[A-Za-z])(?=[A-Za-z0-9@$]*[0134579@$])[A-Za-z0-9@$]{3,}\b")
_LEET_VOCAB = COMMON_WORDS | frozenset(HARM_TERMS)


class EncodingsConfig(DetectorConfig):
    """Settings of the encodings detector."""

    min_words: int = Field(20, ge=1, description="Letter words a text needs before the shift test applies.")
    min_leet: int = Field(3, ge=1, description="Leetspeak words a row needs to be flagged.")


def _readable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch in string.printable for ch in text)
    if not text or printable / len(text) < 0.95 or " " not in text.strip():
        return None
    return text


def _common_share(text: str) -> tuple[float, int]:
    words = _WORDS.findall(text.lower())
    if not words:
        return 0.0, 0
    return sum(w in COMMON_WORDS for w in words) / len(words), len(words)


def _shift(text: str, k: int) -> str:
    lo, up = string.ascii_lowercase, string.ascii_uppercase
    return text.translate(str.maketrans(lo + up, lo[k:] + lo[:k] + up[k:] + up[:k]))


def _scripts(word: str) -> set[str]:
    out = set()
    for ch in word:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            out.add(name.split(" ")[0])
    return out


def encoding_reasons(text: str, *, min_words: int = 20, min_leet: int = 3) -> list[str]:
    """Why ``text`` looks encoded or obfuscated (empty when it does not)."""
    reasons: list[str] = []
    if ZERO_WIDTH_IN_WORD.search(text) or len(ZERO_WIDTH.findall(text)) >= 5:
        reasons.append(f"{len(ZERO_WIDTH.findall(text))} zero-width characters")
    if BIDI.search(text):
        reasons.append("bidirectional control characters")
    mixed = [w for w in re.findall(r"\w+", text) if "LATIN" in _scripts(w) and any(ch in CONFUSABLE for ch in w)]
    if mixed:
        reasons.append(f"homoglyphs: {len(mixed)} words mix Latin with Cyrillic/Greek letters ({clip(mixed[0], 20)!r})")
    for m in BASE64_RUN.finditer(text):
        run = m.group(0)
        try:
            decoded = _readable(base64.b64decode(run + "=" * (-len(run) % 4), validate=True))
        except (binascii.Error, ValueError):
            decoded = None
        if decoded is not None:
            reasons.append(f"base64 that decodes to text ({clip(decoded, 40)!r})")
            break
    for m in HEX_RUN.finditer(text):
        try:
            decoded = _readable(bytes.fromhex(re.sub(r"[ :]", "", m.group(0))))
        except ValueError:
            decoded = None
        if decoded is not None:
            reasons.append(f"hex that decodes to text ({clip(decoded, 40)!r})")
            break
    share, n = _common_share(text)
    if n >= min_words and share < 0.1:
        best_k, best = 0, share
        for k in range(1, 26):
            s, _ = _common_share(_shift(text, k))
            if s > best:
                best_k, best = k, s
        if best >= 0.3 and best >= 3 * share:
            name = "rot13" if best_k == 13 else f"Caesar shift {26 - best_k}"
            reasons.append(f"{name}: {best:.0%} common English words once decoded, {share:.0%} as written")
    leet = [t for t in _LEET_TOKEN.findall(text) if not t.isdigit() and t.lower().translate(LEET) in _LEET_VOCAB]
    if len(leet) >= min_leet:
        reasons.append(f"leetspeak: {len(leet)} words such as {', '.join(repr(t) for t in leet[:3])}")
    return reasons


@register("detector", "encodings", description="base64/hex/rot13/leetspeak answers, zero-width and homoglyph text.")
class EncodingsDetector(Detector):
    """Encodings, ciphers and hidden characters (see the module docstring)."""

    name = "encodings"
    config_class = EncodingsConfig

    def observe(self, rows: Sequence[Row]) -> None:
        """Flag each row whose system, user or assistant text looks encoded."""
        assert isinstance(self.config, EncodingsConfig)
        for row in rows:
            found: list[str] = []
            for role, text in (("system", row.system), ("user", row.user), ("assistant", row.assistant)):
                if text:
                    found += [
                        f"{role}: {r}"
                        for r in encoding_reasons(text, min_words=self.config.min_words, min_leet=self.config.min_leet)
                    ]
            if found:
                self.flag(row, min(1.0, 0.6 + 0.2 * len(found)), "; ".join(found), reasons=found)
