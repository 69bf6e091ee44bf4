"""Choice scoring (``HFGenerator.choose``) and the utility task's ``scoring="choices"`` on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import make_model, make_tokenizer
from tunesec.data.schema import Example, Message
from tunesec.errors import UsageError
from tunesec.evals import evaluate
from tunesec.evals.utility import UtilityTask
from tunesec.models import GenerationConfig
from tunesec.models.chat import ChatFormatter
from tunesec.models.generation import HFGenerator
from tunesec.models.loading import LoadedModel
from tunesec.models.ref import ModelRef
from tunesec.models.types import Generation

PROMPTS = ["Is this good? a charming journey", "Classify: stocks rallied", "x", "A much longer prompt " * 6]
CHOICES = [["positive", "negative"], ["World", "Sports", "Business", "Sci/Tech"], ["a b c", "a"], ["Sci/Tech", "no"]]


def _engine(arch: str = "llama") -> HFGenerator:
    tok = make_tokenizer()
    return HFGenerator(LoadedModel(ref=ModelRef(base=f"tiny-{arch}"), model=make_model(tok, arch=arch), tokenizer=tok))


def _reference_logprob(engine: HFGenerator, prompt: str, choice: str) -> float:
    """One unpadded forward pass over prompt + choice, full logits: the ground truth."""
    ids = ChatFormatter(engine.tokenizer).encode([{"role": "user", "content": prompt}])
    cont = engine.tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids + cont])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(cont)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_choose_matches_unpadded_reference(arch: str) -> None:
    engine = _engine(arch)
    assert len(engine.tokenizer("Sci/Tech", add_special_tokens=False)["input_ids"]) > 1  # a many-token choice
    out = engine.choose(PROMPTS, CHOICES, GenerationConfig(batch_size=3), progress=False)
    assert len(out) == len(PROMPTS)
    for prompt, options, gen in zip(PROMPTS, CHOICES, out, strict=True):
        assert gen.choice_logprobs is not None and list(gen.choice_logprobs) == options
        for choice in options:
            assert gen.choice_logprobs[choice] == pytest.approx(_reference_logprob(engine, prompt, choice), abs=1e-4)
        # the pick maximises the byte-normalised log-probability
        best = max(options, key=lambda c: gen.choice_logprobs[c] / len(c.encode()))  # type: ignore[index]
        assert gen.text == best
    # batch size changes nothing
    one = engine.choose(PROMPTS, CHOICES, GenerationConfig(batch_size=1), progress=False)
    for a, b in zip(out, one, strict=True):
        assert a.text == b.text
        assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-4)


def test_choose_rejects_bad_choice_lists() -> None:
    engine = _engine()
    with pytest.raises(ValueError, match="choice lists"):
        engine.choose(["a"], [], progress=False)
    with pytest.raises(ValueError, match="no choices"):
        engine.choose(["a"], [[]], progress=False)


def _sst2(n: int) -> list[Example]:
    return [
        Example(
            id=f"s{i}",
            messages=[Message(role="user", content=f"sentence number {i}")],
            label=str(i % 2),
            source="sst2",
        )
        for i in range(n)
    ]


def test_utility_choices_end_to_end(tmp_path: Path) -> None:
    engine = _engine()
    report = evaluate(
        "tiny",
        task="utility",
        task_options={"scoring": "choices"},
        dataset=_sst2(6),
        generator=engine,
        out=tmp_path / "run",
        progress=False,
        html=False,
    )
    assert report.spec["task"] == {"name": "utility", "kind": "auto", "scoring": "choices"}
    assert report.metrics["unparsed_rate"].k == 0  # a chosen label always parses
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert all(
        r["response"] in ("positive", "negative") and set(r["choice_logprobs"]) == {"positive", "negative"}
        for r in records
    )
    assert report.metrics["accuracy"].k == sum(r["correct"] for r in records)


def test_utility_choices_needs_log_probabilities_and_label_tasks(tmp_path: Path) -> None:
    class TextOnly:
        name = "api"

        def generate(self, prompts, config=None, *, progress=True):  # type: ignore[no-untyped-def]
            return [Generation(text="positive") for _ in prompts]

    with pytest.raises(UsageError, match="needs token log-probabilities"):
        evaluate(
            "api",
            task=UtilityTask(scoring="choices"),
            dataset=_sst2(2),
            generator=TextOnly(),
            out=tmp_path / "a",
            progress=False,
            html=False,
        )
    assert not (tmp_path / "a").exists()  # refused before the run directory is made
    with pytest.raises(UsageError, match="needs token log-probabilities"):
        evaluate(
            "openai:gpt-4o-mini",
            task=UtilityTask(scoring="choices"),
            dataset=_sst2(2),
            out=tmp_path / "b",
            progress=False,
            html=False,
        )
    assert not (tmp_path / "b").exists()
    gsm = [Example(id="g", messages=[Message(role="user", content="1+1?")], label="2", source="gsm8k")]
    with pytest.raises(UsageError, match="needs a label task"):
        UtilityTask(scoring="choices").choices(gsm)
    with pytest.raises(UsageError, match="scoring 'logits'"):
        UtilityTask(scoring="logits")  # type: ignore[arg-type]
    assert UtilityTask().choices(_sst2(1)) is None
    # the default scoring leaves the spec as it was, so runs made before the option existed still resume
    assert UtilityTask().spec() == {"name": "utility", "kind": "auto"}


def test_choose_without_logits_to_keep() -> None:
    """A model whose forward has no ``logits_to_keep`` is scored from its full logits, with the same result."""
    engine = _engine()
    expected = engine.choose(PROMPTS, CHOICES, progress=False)

    class NoKeep(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    engine.model = NoKeep(engine.model)
    got = engine.choose(PROMPTS, CHOICES, progress=False)
    for a, b in zip(expected, got, strict=True):
        assert a.text == b.text
        assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-4)
