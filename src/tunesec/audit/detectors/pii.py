"""PII and secrets: e-mail addresses, phone numbers, payment cards, IBANs, API keys and tokens.

Maintained libraries do the checking where one fits: ``phonenumbers`` (Google's libphonenumber) finds and
validates phone numbers, ``python-stdnum`` checks card numbers (Luhn) and IBANs (ISO 13616 check digits), and
``detect-secrets`` (Yelp) recognises API keys and tokens by their documented formats (AWS, GitHub, GitLab,
Slack, Stripe, OpenAI, private-key blocks, JWTs ...; its entropy and keyword heuristics are left out: on prose
they flag ordinary words). E-mail addresses are a regular expression (RFC 5322's common subset): no library
fits better for finding them in free text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pydantic import Field

from tunesec.audit.base import Detector, DetectorConfig, Row
from tunesec.registry import register

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_DIGITS7 = re.compile(r"(?:\d\D{0,3}){7,}")
SECRET_PLUGINS = (
    "ArtifactoryDetector AWSKeyDetector AzureStorageKeyDetector BasicAuthDetector DiscordBotTokenDetector "
    "GitHubTokenDetector GitLabTokenDetector JwtTokenDetector MailchimpDetector NpmDetector OpenAIDetector "
    "PrivateKeyDetector PypiTokenDetector SendGridDetector SlackDetector SquareOAuthDetector StripeDetector "
    "TelegramBotTokenDetector TwilioKeyDetector"
).split()


class PIIConfig(DetectorConfig):
    """Settings of the PII and secrets detector."""

    region: str = Field("US", description="Default region for phone numbers written without a country code.")
    kinds: list[str] = Field(
        ["email", "phone", "card", "iban", "secret"], description="What to look for (any of the five)."
    )


@lru_cache(maxsize=1)
def _secret_plugins() -> list[Any]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    classes: list[Any] = list(get_mapping_from_secret_type_to_class().values())
    return [cls() for cls in classes if cls.__name__ in SECRET_PLUGINS]


def find_pii(
    text: str, region: str = "US", kinds: Sequence[str] = ("email", "phone", "card", "iban", "secret")
) -> list[str]:
    """What PII or secrets ``text`` holds, one short description each (values masked)."""
    found: list[str] = []
    if "email" in kinds:
        found += [f"e-mail {_mask(m.group(0))}" for m in EMAIL.finditer(text)]
    if "card" in kinds:
        from stdnum import luhn

        for m in CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group(0))
            if 13 <= len(digits) <= 19 and digits[0] in "3456" and luhn.is_valid(digits):
                found.append(f"card number {_mask(digits)} (Luhn valid)")
    if "iban" in kinds:
        from stdnum import iban

        for m in IBAN.finditer(text):
            if iban.is_valid(m.group(0)):
                found.append(f"IBAN {_mask(m.group(0).replace(' ', ''))}")
    if "phone" in kinds and _DIGITS7.search(text):
        import phonenumbers

        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            found.append(f"phone {_mask(match.raw_string)}")
    if "secret" in kinds:
        for plugin in _secret_plugins():
            found += [str(plugin.secret_type) for _ in plugin.analyze_string(text)]
    return found


def _mask(value: str) -> str:
    """The value with all but its first two and last two characters replaced (reports must not leak it)."""
    v = value.strip()
    return v if len(v) <= 4 else v[:2] + "*" * (len(v) - 4) + v[-2:]


@register(
    "detector", "pii", description="E-mail, phone, card (Luhn), IBAN, API keys (phonenumbers, stdnum, detect-secrets)."
)
class PIIDetector(Detector):
    """PII and secrets (see the module docstring)."""

    name = "pii"
    config_class = PIIConfig

    def observe(self, rows: Sequence[Row]) -> None:
        """Flag each row that holds PII or a secret."""
        assert isinstance(self.config, PIIConfig)
        for row in rows:
            found = find_pii(row.text, self.config.region, self.config.kinds)
            if found:
                secret = any(not f.startswith(("e-mail", "phone", "card", "IBAN")) for f in found)
                self.flag(row, 1.0 if secret else 0.8, "; ".join(dict.fromkeys(found)), found=found[:10])
