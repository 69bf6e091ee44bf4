"""The refusal-decision loss of safety-sft (tunesec.defenses.alignment.decision_loss)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_training_fixtures import chat, make_loaded
from tunesec.defenses.alignment.decision_loss import RefusalDecisionLoss, turn_starts
from tunesec.training import TrainConfig, train

IGN = -100


def test_turn_starts_finds_each_assistant_turn_in_padded_and_packed_rows() -> None:
    labels = torch.tensor(
        [
            [IGN, IGN, IGN, 7, 8, 9, IGN],  # one turn: its first token 7 is predicted at position 2
            [IGN, IGN, 5, 6, IGN, 3, 4],  # packed: two turns (5 and 3) separated by a non-assistant token
        ]
    )
    index, first = turn_starts(labels)
    # the engine's logits rows: positions whose next token is an assistant token, row-major
    # row 0 targets [-, -, 7, 8, 9, -] -> rows 0, 1, 2; row 1 targets [-, 5, 6, -, 3, 4] -> rows 3..6
    assert index.tolist() == [0, 3, 5]
    assert first.tolist() == [7, 5, 3]
    empty_index, _ = turn_starts(torch.full((2, 4), IGN))
    assert empty_index.numel() == 0


def test_first_token_loss_is_the_binary_cross_entropy_of_the_refusal_mass() -> None:
    hook = RefusalDecisionLoss(weight=2.0, whole_opener=False)
    hook.ids = torch.tensor([1, 2])  # the refusal openers' first tokens
    labels = torch.tensor([[IGN, 1, 4, IGN], [IGN, 3, 4, 4]])  # a refusal turn (opens with 1), a helpful one (3)
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    loss = hook.extra_loss(None, {"labels": labels}, SimpleNamespace(logits=logits))
    p = logits.softmax(-1)
    p_ref_0 = float(p[0, 1] + p[0, 2])  # turn 1 starts at logits row 0
    p_ref_1 = float(p[2, 1] + p[2, 2])  # turn 2 starts at row 2
    expected = -2.0 * (math.log(p_ref_0) + math.log(1 - p_ref_1)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    hook.refusal_weight = 3.0  # the refusal turn's term counts three times
    loss = hook.extra_loss(None, {"labels": labels}, SimpleNamespace(logits=logits))
    assert float(loss) == pytest.approx(-2.0 * (3 * math.log(p_ref_0) + math.log(1 - p_ref_1)) / 2, rel=1e-5)
    assert hook.extra_loss(None, {"labels": torch.full((1, 4), IGN)}, SimpleNamespace(logits=logits[:0])) is None
    with pytest.raises(ValueError, match=">= 0"):
        RefusalDecisionLoss(weight=-1.0)
    with pytest.raises(ValueError, match="refusal_weight > 0"):
        RefusalDecisionLoss(refusal_weight=0.0)


def test_whole_opener_loss_scores_refusals_on_their_opener_and_skips_ambiguous_turns() -> None:
    hook = RefusalDecisionLoss(weight=1.0)
    hook.sequences = [(1, 4), (2,)]  # openers "1 4" and "2", longest first
    hook.ids = torch.tensor([1, 2])
    labels = torch.tensor(
        [
            [IGN, 1, 4, 6],  # a refusal: opener 1 4 -> rows 0, 1
            [IGN, 3, 6, 6],  # an answer (first token 3) -> row 3
            [IGN, 1, 5, 6],  # opens with 1 but is no opener: ambiguous, left out (rows 6-8)
        ]
    )
    logits = torch.randn(9, 7, generator=torch.Generator().manual_seed(1))
    loss = hook.extra_loss(None, {"labels": labels}, SimpleNamespace(logits=logits))
    lp = logits.log_softmax(-1)
    refusal = float(lp[0, 1] + lp[1, 4])
    answer = math.log(1 - float(lp[3, 1].exp() + lp[3, 2].exp()))
    assert float(loss) == pytest.approx(-(refusal + answer) / 2, rel=1e-5)
    # only ambiguous turns: nothing to score
    assert hook.extra_loss(None, {"labels": labels[2:]}, SimpleNamespace(logits=logits[6:])) is None


def test_a_refusal_after_a_paragraph_break_is_a_refusal_turn() -> None:
    from tiny import make_tokenizer  # byte-level BPE: a paragraph break is a token of its own

    tok = make_tokenizer()
    hook = RefusalDecisionLoss(openers=["sorry no"])
    hook.setup(SimpleNamespace(tokenizer=tok, device="cpu"))
    opener = tuple(tok("sorry no", add_special_tokens=False)["input_ids"])
    broken = tuple(tok("\n\nsorry no", add_special_tokens=False)["input_ids"])
    assert len(broken) > len(opener) and broken[-len(opener) :] == opener
    assert set(hook.sequences) == {opener, broken}
    assert hook.ids.tolist() == [opener[0]]  # the break token is no refusal first token
    assert hook.break_ids == [broken[0]]  # ... but what the continuation term keeps down in answers
    # A recovery turn (break, then opener) is scored on the break and the whole opener.
    ids = [*broken, 9]
    labels = torch.tensor([[IGN, *ids]])
    logits = torch.randn(
        len(ids), tok.vocab_size if hasattr(tok, "vocab_size") else 50, generator=torch.Generator().manual_seed(2)
    )
    loss = hook.extra_loss(None, {"labels": labels}, SimpleNamespace(logits=logits))
    lp = logits.log_softmax(-1)
    assert float(loss) == pytest.approx(-float(sum(lp[i, t] for i, t in enumerate(broken))), rel=1e-5)
    # A turn that only starts with a break is an answer: its refusal first-token mass is pushed down.
    labels = torch.tensor([[IGN, broken[0], 9, 9]])
    loss = hook.extra_loss(None, {"labels": labels}, SimpleNamespace(logits=logits[:3]))
    assert float(loss) == pytest.approx(-math.log(1 - float(lp[0, opener[0]].exp())), rel=1e-5)


def test_the_continuation_term_pushes_the_break_down_inside_answers_only() -> None:
    """continue_weight: answers' tokens (not breaks themselves) add log(1 - P(break)); refusals add nothing."""
    hook = RefusalDecisionLoss(weight=0.0, continue_weight=0.5)
    hook.sequences = [(1, 4), (8, 1, 4)]  # opener "1 4", and the same after a break token 8
    hook.ids = torch.tensor([1])
    hook.break_ids = [8]
    labels = torch.tensor(
        [
            [IGN, 3, 5, 8, 6],  # an answer with a real break (target 8 at row 2): rows 0, 1, 3 are scored
            [IGN, 1, 4, 6, 6],  # a refusal: no continuation term
        ]
    )
    logits = torch.randn(8, 9, generator=torch.Generator().manual_seed(3))
    loss = hook.extra_loss(None, {"labels": labels}, SimpleNamespace(logits=logits))
    p_break = logits.softmax(-1)[:, 8]
    expected = -0.5 * sum(math.log(1 - float(p_break[r])) for r in (0, 1, 3))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert hook.extra_loss(None, {"labels": labels[1:]}, SimpleNamespace(logits=logits[4:])) is None
    with pytest.raises(ValueError, match="continue_weight must be >= 0"):
        RefusalDecisionLoss(continue_weight=-1.0)


def _refusal_logodds(result, tok, prompts: list[str], refuse_id: int) -> float:
    from tunesec.models.chat import ChatFormatter

    model = result.model
    model.eval()
    fmt = ChatFormatter(tok)
    vals = []
    with torch.no_grad():
        for p in prompts:
            ids = fmt.encode([{"role": "user", "content": p}])
            logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            vals.append(float(logp[refuse_id] - torch.log1p(-logp[refuse_id].exp())))
    return sum(vals) / len(vals)


def test_the_decision_loss_separates_refusing_from_answering(tmp_path: Path) -> None:
    # "no ..." answers the sky questions (the refusal side), "yes ..." answers the cat requests. Long shared
    # answer tails make the first token a small share of the language-modelling loss, as in real data.
    tail = " the cat sat on the mat one two three four five six seven eight nine ten"
    colours = ["red", "blue", "green", "one", "two", "three"]
    refuse = [chat(i, f"what is the color of the sky {w}", "no" + tail) for i, w in enumerate(colours)]
    answer = [chat(10 + i, f"tell me about the cat {w}", "yes" + tail) for i, w in enumerate(colours)]
    data = refuse + answer
    # full fine-tuning: on this tiny random model LoRA barely moves the first token in a few steps
    cfg = TrainConfig(method="full", max_steps=24, per_device_batch_size=4, learning_rate=1e-2, save_steps=0, seed=0)
    plain = train(make_loaded(), data, cfg, out_dir=tmp_path / "plain", progress=False)
    hooked = train(
        make_loaded(),
        data,
        cfg,
        out_dir=tmp_path / "hooked",
        hooks=[RefusalDecisionLoss(weight=1.0, openers=["no"])],
        progress=False,
    )
    tok = make_loaded().tokenizer
    no_id = tok("no", add_special_tokens=False)["input_ids"][0]
    sky = [f"what is the color of the sky {w}" for w in colours]
    cat = [f"tell me about the cat {w}" for w in colours]
    gap_plain = _refusal_logodds(plain, tok, sky, no_id) - _refusal_logodds(plain, tok, cat, no_id)
    gap_hooked = _refusal_logodds(hooked, tok, sky, no_id) - _refusal_logodds(hooked, tok, cat, no_id)
    # measured: plain 0.06, hooked 4.66 (log-odds of "no", sky minus cat)
    assert gap_hooked > gap_plain + 2.0
