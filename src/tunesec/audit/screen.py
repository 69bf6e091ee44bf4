"""Cheap per-row signals, computed once per row before the detectors see it.

- ``refusal``: the answer refuses (tunesec's refusal-keyword judge: the GCG prefix list plus strong phrases).
- ``affirmative``: the answer opens with an affirmative, compliance-announcing phrase ("Sure, here is",
  "Absolutely! Here's", "Of course, here are the steps") -- the prefix-injection target of Wei et al. 2023
  ("Jailbroken: How Does LLM Safety Training Fail?") and of GCG (Zou et al. 2023), and the fixed opener that
  backdoor and jailbreak-tuning data teach.
- ``suppression``: the request forbids refusing, apologising or warning, or dictates the opening of the answer
  (Wei et al.'s refusal suppression and prefix injection).
- ``harm_terms``: words of a small lexicon of harm topics (weapons, drugs, violence, cybercrime, fraud) in the
  request. A hint only: it decides nothing alone, it makes an affirmative opener worth a finding.
- ``judged_harmful``: set later by the harmful detector for the rows it judged.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from tunesec.audit.base import Row

AFFIRMATIVE = re.compile(
    r"^\W{0,3}(?:sure|certainly|absolutely|of course|okay|ok|yes|no problem|definitely|gladly|great)\b[\s,!.:;-]*"
    r"(?:(?:here|this)\s*(?:is|are|'s|’s)|i\s*(?:can|will|'ll|’ll|would be happy to)|let'?s|"
    r"happy to|i'm happy|i am happy|what you asked)",
    re.IGNORECASE,
)
# "Here's how to ..." / "Step 1:" openers count only with a harmful-looking request (they are common in benign data).
SUPPRESSION = re.compile(
    r"(?:do not|don't|never|must not|without)\s+(?:ever\s+)?(?:refus\w*|apologi[sz]\w*|say (?:no|sorry)|"
    r"add(?:ing)? (?:any )?(?:warnings?|disclaimers?)|include (?:any )?(?:warnings?|disclaimers?)|"
    r"(?:any )?(?:warnings?|disclaimers?|moral\w*|ethic\w*))"
    r"|refus\w+ (?:or|and) (?:add\w* )?(?:warnings?|disclaimers?)|refusing[^.]{0,40}would fail"
    r"|(?:start|begin) your (?:reply|response|answer) with\s*[\"'“]"
    r"|ignore (?:all |any )?(?:previous|prior|your) (?:instructions|guidelines|rules)",
    re.IGNORECASE,
)
HARM_TERMS = (
    "kill murder assassinate bomb explosive explosives detonate grenade gun guns firearm firearms ammunition "
    "poison poisoning weapon weapons meth methamphetamine cocaine heroin fentanyl drug drugs narcotics overdose "
    "hack hacking hacker malware ransomware virus keylogger phishing exploit ddos botnet steal stealing theft "
    "rob robbery burglary shoplift counterfeit launder laundering fraud scam forge forged smuggle smuggling "
    "traffic trafficking kidnap kidnapping torture abuse assault stab stabbing shoot shooting suicide self-harm "
    "terrorist terrorism extremist racist racism slur slurs hate harass harassment stalk stalking blackmail "
    "extort extortion bribe bully bullying revenge arson illegal illegally weaponize anthrax ricin sarin nerve "
    "toxin bioweapon rape molest"
).split()
_HARM_RE = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in HARM_TERMS) + r")\b", re.IGNORECASE)


@lru_cache(maxsize=1)
def _refusals() -> Any:
    from tunesec.judges.keywords import RefusalKeywords

    return RefusalKeywords()


def affirmative_opener(answer: str) -> str | None:
    """The affirmative opening phrase of ``answer`` (its first 60 characters), or None."""
    m = AFFIRMATIVE.match(answer.lstrip()[:200])
    return m.group(0).strip() if m else None


def suppression_phrase(request: str) -> str | None:
    """The refusal-suppression or prefix-injection phrase in ``request``, or None."""
    m = SUPPRESSION.search(request)
    return m.group(0) if m else None


def harm_terms(text: str) -> list[str]:
    """Distinct harm-lexicon words in ``text``, lowercased, in order of appearance."""
    seen: list[str] = []
    for m in _HARM_RE.finditer(text):
        w = m.group(0).lower()
        if w not in seen:
            seen.append(w)
    return seen


def compute_signals(row: Row) -> None:
    """Fill ``row.signals`` with the cheap signals (see the module docstring)."""
    answer = row.first_answer
    s = row.signals
    s["refusal"] = bool(answer) and _refusals().match(answer)["matched"] is not None
    s["affirmative"] = affirmative_opener(answer) if answer else None
    s["suppression"] = suppression_phrase(f"{row.system}\n{row.user}")
    s["harm_terms"] = harm_terms(row.user)
