"""Labelled (prompt, response) data for training and benchmarking the harm classifier and the judges.

Read directly from the public dataset files (``../shared/data``, see its README); this is not a tunesec dataset
loader, only the recipe that builds the classifier's training set, so the training script and
``benchmarks/judges.py`` evaluate on exactly the same held-out split.

Classes (:data:`tunesec.judges.classifier.LABELS`):

- ``refusal``: harmful instruction + safe answer or refusal (safety_tuned_llamas
  ``safety_only_data_Instructions.json``, Bianchi et al. 2024), plus hard cases built inside each split from that
  split's own refusals: BeaverTails harmful questions + a refusal, and benign Alpaca/Dolly prompts + a refusal
  (an over-refusal is not harm).
- ``harmful``: BeaverTails harmful question + harmful answer (``beavertails_mixed_xinykou`` sst2 p0.2 rows with
  ``flag == "unsafe"``, the Alpaca template stripped from the question).
- ``benign``: Alpaca (``alpaca_data_1k.json``), Dolly (``dolly.jsonl``), 150 short SST-2 task answers from the same
  mix (``flag == "finetune"``) and 150 GSM8K train answers.

The split is by prompt: sha256 of the whitespace-normalised, lower-cased prompt modulo 100 gives train (< 70),
val (< 85) or test, so a prompt never crosses splits.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tunesec.errors import UsageError

FILES = {
    "refusal": "safety_tuned_llamas/training/safety_only_data_Instructions.json",
    "harmful": "beavertails_mixed_xinykou/sst2/train_merged_n1000_p0.2.json",
    "alpaca": "alpaca/alpaca_data_1k.json",
    "dolly": "dolly/dolly.jsonl",
    "gsm8k": "gsm8k/train.jsonl",
}
REFUSAL_START = re.compile(
    r"^\s*(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i can not|as an ai|i'?m not able|"
    r"i am not able|i will not|i won'?t|sorry)",
    re.I,
)
_TEMPLATE = re.compile(r"### Instruction:\s*(.*?)\s*(?:### Input:\s*(.*?)\s*)?### Response:", re.S)


@dataclass(frozen=True)
class Item:
    """One labelled (prompt, response) pair and where it came from."""

    prompt: str
    response: str
    label: str
    source: str


def strip_alpaca_template(text: str) -> str:
    """The instruction (and input) inside an Alpaca prompt template; the text itself if it has none."""
    m = _TEMPLATE.search(text)
    if not m:
        return text.strip()
    instruction, inp = m.group(1).strip(), (m.group(2) or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def split_of(prompt: str) -> str:
    """Deterministic split by prompt content, so equal prompts always land in the same split."""
    h = int(hashlib.sha256(" ".join(prompt.lower().split()).encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else "val" if h < 85 else "test"


def join_input(instruction: str, inp: str) -> str:
    """An instruction followed by its input (if any), as one prompt."""
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def load_items(data: str | Path, seed: int = 0) -> tuple[dict[str, list[Item]], dict[str, str]]:
    """Labelled items per split (``train``, ``val``, ``test``) and the sha256 of every file read.

    Args:
        data: The public datasets folder (``shared/data``).
        seed: Seed for the subsamples and for pairing prompts with refusals in the hard cases.

    Raises:
        UsageError: A dataset file is missing.
    """
    data = Path(data)
    rng = random.Random(seed)
    base: list[Item] = []
    hashes = {}
    for rel in FILES.values():
        path = data / rel
        if not path.is_file():
            raise UsageError(f"{path}: not found; expected the public dataset file {rel} (see shared/data/README.md)")
        hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()

    for r in json.loads((data / FILES["refusal"]).read_text()):
        base.append(Item(join_input(r["instruction"], r.get("input", "")), r["output"], "refusal", "safety-llamas"))
    mix = json.loads((data / FILES["harmful"]).read_text())
    seen: set[tuple[str, str]] = set()
    for r in mix:
        if r["flag"] == "unsafe":
            pair = (r["instruction"], r["output"])
            if pair not in seen:
                seen.add(pair)
                base.append(Item(strip_alpaca_template(r["instruction"]), r["output"], "harmful", "beavertails"))
    sst = [r for r in mix if r["flag"] == "finetune"]
    rng.shuffle(sst)
    for r in sst[:150]:
        base.append(Item(strip_alpaca_template(r["instruction"]), r["output"], "benign", "sst2-task"))
    for r in json.loads((data / FILES["alpaca"]).read_text()):
        base.append(Item(join_input(r["instruction"], r.get("input", "")), r["output"], "benign", "alpaca"))
    for line in (data / FILES["dolly"]).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            base.append(Item(strip_alpaca_template(r["prompt"]), r["answer"], "benign", "dolly"))
    gsm = [json.loads(line) for line in (data / FILES["gsm8k"]).read_text().splitlines() if line.strip()]
    rng.shuffle(gsm)
    for r in gsm[:150]:
        base.append(Item(r["question"], r["answer"], "benign", "gsm8k"))

    splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for it in base:
        splits[split_of(it.prompt)].append(it)
    # Hard cases, built inside each split from that split's own refusals: the refusal class must depend on the
    # response, not on the style of the prompt (BeaverTails questions vs safety-llamas instructions).
    for items in splits.values():
        pool = [it.response for it in items if it.label == "refusal" and REFUSAL_START.match(it.response)]
        extra = []
        for it in items:
            if it.source == "beavertails":
                extra.append(Item(it.prompt, rng.choice(pool), "refusal", "beavertails+refusal"))
        benign = [it for it in items if it.source in ("alpaca", "dolly")]
        for it in rng.sample(benign, k=min(len(benign), len(benign) // 4)):
            extra.append(Item(it.prompt, rng.choice(pool), "refusal", "benign+refusal"))
        items.extend(extra)
    return splits, hashes
