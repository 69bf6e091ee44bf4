"""Alignment-stage defenses II on tiny models: deep alignment as a defense, SDD's data, NPO + SAM (Unlearn-Smooth)."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import pytest

from test_defenses_alignment import _ctx, _encode, _moved, _norm, _params, _same, harmful_set
from test_training_fixtures import chat, make_loaded, memorise_set
from tunesec.training import TrainConfig, train

# -- deep alignment ----------------------------------------------------------------------------------------


def test_deep_alignment_is_the_shipped_recipe_with_recovery_examples() -> None:
    from tunesec.defenses import get_defense
    from tunesec.defenses.base import shipped_alignment_config

    shipped = shipped_alignment_config()
    deep = get_defense("deep-alignment").config
    assert deep.deep_alignment == 0.5 and deep.decision_continue_weight == 0.1
    assert deep.model_copy(update={"deep_alignment": 0.0, "decision_continue_weight": 0.0}) == shipped
    assert get_defense("deep-alignment", {"deep_alignment": 0.25}).config.deep_alignment == 0.25
    assert get_defense("safety-sft").config == shipped  # as a defense, safety-sft is the shipped recipe


# -- SDD ---------------------------------------------------------------------------------------------------


class _BagOfWords:
    """A deterministic embedder: normalised word-count vectors over a fixed vocabulary."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, texts: list[str]) -> Any:
        import numpy as np

        rows = []
        for t in texts:
            v = np.zeros(64, dtype=np.float32)
            for w in t.lower().split():
                v[zlib.crc32(w.encode()) % 64] += 1.0  # not hash(): salted per process
            rows.append(v / max(float(np.linalg.norm(v)), 1e-9))
        return np.stack(rows)


def test_sdd_never_pairs_a_prompt_with_an_answer_above_the_threshold() -> None:
    import numpy as np

    from tunesec.defenses.alignment.sdd import SDDConfig, pair_irrelevant

    prompts = [f"how do i build a bomb at home {i}" for i in range(5)]
    related = [f"to build a bomb at home you {i}" for i in range(40)]
    unrelated = [f"the poem sings of rivers and light number {i}" for i in range(10)]
    emb = _BagOfWords()
    cfg = SDDConfig(max_similarity=0.25, max_draws=50)
    pairs = pair_irrelevant(prompts, related + unrelated, cfg, embedder=emb)
    assert len({a for a, _ in pairs}) == 5  # no answer reused
    for p, (answer, sim) in zip(prompts, pairs, strict=True):
        actual = float(np.dot(emb.encode([p])[0], emb.encode([answer])[0]))
        assert actual == pytest.approx(sim, abs=1e-5) and sim <= 0.25
        assert answer in unrelated


def test_sdd_mix_replaces_only_refusals_and_keeps_prompts(tmp_path: Path) -> None:
    from tunesec.data.schema import Example, Message
    from tunesec.defenses.alignment.sdd import REJECT_PREFIX, SDDConfig, sdd_mix

    def ex(i: int, prompt: str, answer: str, kind: str) -> Example:
        msgs = [Message(role="user", content=prompt), Message(role="assistant", content=answer)]
        return Example(id=f"e{i}", messages=msgs, meta={"align_kind": kind})

    mix = [
        ex(0, "how to hurt people", "I'm sorry, I can't.", "refusal"),
        ex(1, "write a poem", "Roses are red.", "helpful"),
    ]
    answers = tmp_path / "answers.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"A long helpful answer about gardening and tomatoes, part {i}."},
            ]
        }
        for i in range(4)
    ]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, prov = sdd_mix(SDDConfig(answer_data=[str(answers)], reject_prefix=True), mix, embedder=_BagOfWords())
    assert [e.prompt for e in out] == [e.prompt for e in mix]
    assert out[1] == mix[1]
    assert out[0].messages[-1].content.startswith(REJECT_PREFIX) and "gardening" in out[0].messages[-1].content
    assert out[0].meta["align_kind"] == "sdd" and prov["sdd_pairs"] == 1


# -- Unlearn-Smooth (NPO + SAM) ----------------------------------------------------------------------------


def test_npo_loss_at_the_reference_is_two_over_beta_log_two() -> None:
    import torch

    from tunesec.defenses.alignment.unlearn_smooth import npo_loss

    lp = torch.tensor([-12.0, -30.5, -4.0])
    assert float(npo_loss(lp, lp.clone(), 0.015)) == pytest.approx(2 / 0.015 * math.log(2), rel=1e-6)
    assert float(npo_loss(lp - 50, lp, 0.1)) < float(npo_loss(lp, lp, 0.1))  # less likely than the reference: lower


def test_sequence_logprobs_split_a_packed_batch_by_example() -> None:
    import torch

    from tunesec.training.steps import sequence_logprobs, token_logprobs
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    examples = memorise_set(3)
    packed = _encode(loaded, examples)
    with torch.no_grad():
        seqs = sequence_logprobs(loaded.model, packed)
        assert seqs.shape == (3,)
        for i, e in enumerate(examples):
            alone = _encode(loaded, [e])
            assert float(seqs[i]) == pytest.approx(float(token_logprobs(loaded.model, alone).sum()), rel=1e-4)
        assert float(-seqs.sum()) / int((packed["labels"][:, 1:] != -100).sum()) == pytest.approx(
            float(lm_loss_mean(loaded.model, packed)), rel=1e-4
        )


def test_npo_sam_term_is_the_npo_gradient_at_the_sam_point(tmp_path: Path) -> None:
    import torch

    from tunesec.defenses.alignment.unlearn_smooth import NPOSmoothing, npo_loss
    from tunesec.training.steps import sequence_logprobs

    loaded = make_loaded()
    model, align, forget = loaded.model, _encode(loaded, memorise_set(4)), _encode(loaded, harmful_set(3))
    hook = NPOSmoothing(beta=0.1, gamma=2.25, rho=0.05)
    ctx = _ctx(loaded, {"harmful": forget})
    ctx.out_dir = tmp_path
    hook.setup(ctx)
    with torch.no_grad():
        ref = sequence_logprobs(model, forget)
    params = _params(model)
    before = [p.detach().clone() for p in params]
    g = list(torch.autograd.grad(npo_loss(sequence_logprobs(model, forget), ref, 0.1), params))
    moved = _moved(model, g, 0.05 / (_norm(g) + 1e-7))
    expected = list(torch.autograd.grad(npo_loss(sequence_logprobs(moved, forget), ref, 0.1), _params(moved)))
    hook.before_step(model, align)
    assert _same([p.detach() for p in params], before)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(hook._term, expected, strict=True))
    assert hook.last_forget_loss == pytest.approx(
        float(npo_loss(sequence_logprobs(moved, forget), ref, 0.1).detach()), rel=1e-4
    )
    assert (tmp_path / "npo_reference.safetensors").is_file()  # the reference survives a resume
    forget_loss = hook.last_forget_loss
    assert hook.pop_metrics() == {"forget_loss": forget_loss} and hook.pop_metrics() == {}


def test_unlearn_smooth_retain_weight_is_gamma() -> None:

    from tunesec.defenses.alignment.unlearn_smooth import NPOSmoothing
    from tunesec.training.trainer import lm_loss_sum

    loaded = make_loaded()
    batch = _encode(loaded, memorise_set(4))
    total, n, outputs = lm_loss_sum(loaded.model, batch)
    extra = NPOSmoothing(beta=0.1, gamma=2.25, rho=0.0).extra_loss(loaded.model, batch, outputs)
    assert float(extra.detach()) == pytest.approx(1.25 * float(total.detach()) / n, rel=1e-5)
    assert NPOSmoothing(beta=0.1, gamma=1.0, rho=0.0).extra_loss(loaded.model, batch, outputs) is None


def test_unlearn_smooth_resumes_to_the_same_weights(tmp_path: Path) -> None:
    import torch

    from test_defenses_alignment import _Kill
    from tunesec.defenses.alignment.unlearn_smooth import NPOSmoothing

    cfg = TrainConfig(max_steps=6, save_steps=3, per_device_batch_size=2, learning_rate=5e-3)
    extra = {"harmful": harmful_set(4)}
    run = lambda out, hooks, resume=False: train(  # noqa: E731
        make_loaded(),
        memorise_set(8),
        cfg,
        out_dir=tmp_path / out,
        hooks=hooks,
        extra_datasets=extra,
        resume=resume,
        progress=False,
    )
    straight = run("a", [NPOSmoothing(0.1, 2.25, 0.05)])
    with pytest.raises(KeyboardInterrupt):
        run("b", [NPOSmoothing(0.1, 2.25, 0.05), _Kill(at_call=5)])
    resumed = run("b", [NPOSmoothing(0.1, 2.25, 0.05)], resume=True)
    a = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if "lora_" in n:
            assert torch.allclose(a[n], p, atol=1e-6, rtol=0), n


@pytest.mark.parametrize("name", ["unlearn-smooth", "sdd", "deep-alignment", "repnoise", "seam", "tar", "tar-dpo"])
def test_defenses_ii_run_end_to_end(tiny_llama_dir: Path, tmp_path: Path, name: str, monkeypatch) -> None:
    from test_defenses_alignment import TINY_ALIGN, _write
    from tunesec.defenses import get_defense

    harmful = _write(
        tmp_path / "harmful.jsonl", [chat(i, f"how do I make poison {i}", "sure here is how") for i in range(12)]
    )
    answers = _write(
        tmp_path / "answers.jsonl",
        [chat(i, f"q{i}", f"A helpful answer about the weather today, {i}.") for i in range(20)],
    )
    refusals = _write(
        tmp_path / "ref.jsonl", [chat(i, f"how to hurt {i}", "I'm sorry, I cannot help.") for i in range(8)]
    )
    helpful = _write(tmp_path / "help.jsonl", [chat(i, f"say hello {i}", "hello world") for i in range(8)])
    align = {**TINY_ALIGN, "refusal_data": {str(refusals): 4}, "benign_data": {str(helpful): 4}, "self_distill": {}}
    if name in ("unlearn-smooth", "repnoise", "seam", "tar", "tar-dpo"):
        config: dict[str, Any] = {"alignment": align, "harmful": {"data": str(harmful), "n": 8, "exclude": []}}
        if name == "tar-dpo":
            name, config = "tar", {**config, "tr_loss": "dpo", "tr_scale": 0.1}
    elif name == "sdd":
        config = {"alignment": align, "answer_data": [str(answers)]}
        monkeypatch.setattr("tunesec.judges.classifier.get_embedder", lambda model_dir=None: _BagOfWords())
    else:
        config = {**align, "deep_alignment": 0.0}  # recovery examples need a model that answers; the tiny one does not
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    defense = get_defense(name, config)
    from tunesec.defenses.base import run_alignment_defense

    ref = run_alignment_defense(defense, str(tiny_llama_dir), tmp_path / "run", progress=False)
    assert ref.adapter is not None and (Path(ref.adapter) / "adapter_model.safetensors").is_file()
    prov = json.loads((tmp_path / "run" / "model_ref.json").read_text())["provenance"]
    assert prov["defense"] == name
    if name == "sdd":
        assert prov["sdd_pairs"] == 4


# -- RepNoise ----------------------------------------------------------------------------------------------


def test_mmd_is_zero_for_identical_samples_and_grows_with_the_shift() -> None:
    import torch

    from tunesec.defenses.alignment.repnoise import mmd

    torch.manual_seed(0)
    x = torch.randn(40, 8)
    assert float(mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    near, far = float(mmd(x, x + 0.1)), float(mmd(x, x + 5.0))
    assert 0 < near < far


def test_logit_lens_scores_every_hidden_state_and_subsamples_tokens() -> None:
    import random

    import torch

    from tunesec.training.steps import logit_lens_losses

    loaded = make_loaded()
    batch = _encode(loaded, memorise_set(3))
    with torch.no_grad():
        out = loaded.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_hidden_states=True)
        every = logit_lens_losses(loaded.model, batch, out.hidden_states)
        n = int((batch["labels"][:, 1:] != -100).sum())
        same = logit_lens_losses(loaded.model, batch, out.hidden_states, tokens=n, rng=random.Random(1))
        some = logit_lens_losses(loaded.model, batch, out.hidden_states, tokens=3, rng=random.Random(1))
    assert every.shape == (len(out.hidden_states),) and bool((every > 0).all())
    assert torch.allclose(every, same) and not torch.allclose(every, some)


def test_repnoise_term_is_beta_mmd_minus_alpha_log_ascent() -> None:
    from tunesec.defenses.alignment.repnoise import RepresentationNoise

    loaded = make_loaded()
    harm = _encode(loaded, harmful_set(3))
    hook = RepresentationNoise(alpha=1.0, beta=0.5, lens_tokens=1000)
    hook.setup(_ctx(loaded, {"harmful": harm}))
    loss = hook.loss(loaded.model, harm)
    expected = 0.5 * hook.last["mmd"] - math.log(1.0 + hook.last["harmful_ce"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in _params(loaded.model))


# -- SEAM --------------------------------------------------------------------------------------------------


def test_seam_hessian_free_estimate_matches_the_exact_gradient_of_the_cosine() -> None:
    import torch

    from tunesec.defenses.alignment.seam import sd_gradient
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    model = loaded.model.double()
    model.config._attn_implementation = "eager"  # SDPA's CPU kernel has no second derivative
    a, b = _encode(loaded, harmful_set(2)), _encode(loaded, memorise_set(3))
    params = _params(model)

    def grads(batch: dict, create: bool = False) -> list:
        return list(torch.autograd.grad(lm_loss_mean(model, batch), params, create_graph=create))

    ga, gb = grads(a, True), grads(b, True)
    dot = sum((x * y).sum() for x, y in zip(ga, gb, strict=True))
    na = torch.sqrt(sum((x * x).sum() for x in ga))
    nb = torch.sqrt(sum((y * y).sum() for y in gb))
    exact = list(torch.autograd.grad(dot / (na * nb), params))
    before = [p.detach().clone() for p in params]
    est, cos = sd_gradient(lambda batch: [g.detach() for g in grads(batch)], params, a, b, eps=1e-4)
    assert _same([p.detach() for p in params], before)
    assert cos == pytest.approx(float((dot / (na * nb)).detach()), rel=1e-6)
    flat_e = torch.cat([e.flatten() for e in est])
    flat_x = torch.cat([x.flatten() for x in exact])
    assert float(torch.nn.functional.cosine_similarity(flat_e, flat_x, dim=0)) > 0.999
    assert float((flat_e - flat_x).norm() / flat_x.norm()) < 0.02


@pytest.mark.parametrize("name", ["repnoise", "seam", "tar"])
def test_representation_defenses_resume_to_the_same_weights(tmp_path: Path, name: str) -> None:
    import torch

    from test_defenses_alignment import _Kill
    from tunesec.defenses.alignment.repnoise import RepresentationNoise
    from tunesec.defenses.alignment.seam import SelfDestruction
    from tunesec.defenses.alignment.tar import TamperResistance

    def hook() -> Any:
        if name == "tar":
            return TamperResistance(inner_steps=2, meta_every=1)
        return RepresentationNoise(1.0, 1e-3, 8) if name == "repnoise" else SelfDestruction(0.01, 1.0, 1e-3, 8)

    cfg = TrainConfig(max_steps=4, save_steps=2, per_device_batch_size=2, learning_rate=5e-3)
    extra = {"harmful": harmful_set(4), "benign": memorise_set(4), "harmful-heldout": harmful_set(3)}
    run = lambda out, hooks, resume=False: train(  # noqa: E731
        make_loaded(),
        memorise_set(8),
        cfg,
        out_dir=tmp_path / out,
        hooks=hooks,
        extra_datasets=extra,
        resume=resume,
        progress=False,
    )
    straight = run("a", [hook()])
    measured = {"tar": {"tamper_loss", "adversary_lr", "anchor"}, "repnoise": {"mmd", "harmful_ce"}}
    keys = {f"{name}/{k}" for k in measured.get(name, {"unlearn", "cos"})}
    assert set(straight.metrics.hook_metrics) == keys  # the terms are logged, a value at every step
    assert all(len(v) == 4 and None not in v for v in straight.metrics.hook_metrics.values())
    with pytest.raises(KeyboardInterrupt):
        run("b", [hook(), _Kill(at_call=3)])
    resumed = run("b", [hook()], resume=True)
    a = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if "lora_" in n:
            assert torch.allclose(a[n], p, atol=1e-6, rtol=0), n


# -- TAR ---------------------------------------------------------------------------------------------------


def test_tar_inner_attack_leaves_the_weights_unchanged_and_its_meta_gradient_is_by_hand(tmp_path: Path) -> None:
    import torch

    from tunesec.defenses.alignment.tar import HELD_OUT, TamperResistance, answer_logits, entropy_loss
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    model = loaded.model
    forget, held, retain = (
        _encode(loaded, harmful_set(2)),
        _encode(loaded, harmful_set(3)),
        _encode(loaded, memorise_set(2)),
    )
    hook = TamperResistance(
        inner_steps=1, meta_every=1, adversary_lrs=[1e-2], tr_scale=4.0, tr_decay=0.0625, anchor=1.0
    )
    ctx = _ctx(loaded, {"harmful": forget, HELD_OUT: held})
    ctx.out_dir = tmp_path
    hook.setup(ctx)
    params = _params(model)
    before = [p.detach().clone() for p in params]
    # by hand: one AdamW step (bias-corrected first step: g / (|g| + eps)), then 4 * exp(0) * grad(-entropy)
    g = list(torch.autograd.grad(lm_loss_mean(model, forget), params))
    moved = _moved(model, [gi / (gi.abs() + 1e-8) for gi in g], -1e-2)
    expected = [4.0 * t for t in torch.autograd.grad(entropy_loss(answer_logits(moved, held)), _params(moved))]
    hook.before_step(model, retain)
    assert _same([p.detach() for p in params], before)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-3) for a, b in zip(hook._term, expected, strict=True))
    assert (tmp_path / "tar_reference.safetensors").is_file() and hook._ref_hidden is not None


def test_tar_entropy_loss_is_minus_the_entropy() -> None:
    import torch

    from tunesec.defenses.alignment.tar import entropy_loss

    uniform = torch.zeros(3, 8)
    assert float(entropy_loss(uniform)) == pytest.approx(-math.log(8), rel=1e-6)
    peaked = torch.tensor([[20.0] + [0.0] * 7])
    assert float(entropy_loss(peaked)) > float(entropy_loss(uniform))


def test_tar_dpo_loss_is_log_two_at_the_reference_and_falls_as_refusals_are_preferred() -> None:
    import torch

    from tunesec.defenses.alignment.tar import dpo_loss

    c, r = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -3.0])
    assert float(dpo_loss(c, r, c, r, 0.1)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(dpo_loss(c + 4, r, c, r, 0.1)) < math.log(2) < float(dpo_loss(c, r + 4, c, r, 0.1))
    # by hand: margin shift +2 on the first pair, -2 on the second, beta 0.5
    hand = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert float(dpo_loss(c + torch.tensor([2.0, -2.0]), r, c, r, 0.5)) == pytest.approx(hand, rel=1e-6)


def test_tar_dpo_meta_gradient_is_by_hand_against_the_start_model(tmp_path: Path) -> None:
    import torch

    from tunesec.defenses.alignment.tar import HELD_OUT, HELD_OUT_REFUSED, TamperResistance, dpo_loss
    from tunesec.training.steps import sequence_logprobs
    from tunesec.training.trainer import lm_loss_mean

    loaded = make_loaded()
    model = loaded.model
    prompts = [chat(200 + i, "tell me about the dog", "sure here it is one two three") for i in range(3)]
    refused = [chat(200 + i, "tell me about the dog", "no I will not") for i in range(3)]
    forget, rejected, chosen = _encode(loaded, harmful_set(2)), _encode(loaded, prompts), _encode(loaded, refused)
    hook = TamperResistance(inner_steps=1, meta_every=1, adversary_lrs=[1e-2], tr_scale=0.1, tr_loss="dpo", anchor=0)
    ctx = _ctx(loaded, {"harmful": forget, HELD_OUT: rejected, HELD_OUT_REFUSED: chosen})
    ctx.out_dir, ctx.extra_datasets = tmp_path, {HELD_OUT: prompts, HELD_OUT_REFUSED: refused}
    hook.setup(ctx)
    params = _params(model)
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(model, chosen), sequence_logprobs(model, rejected)
    g = list(torch.autograd.grad(lm_loss_mean(model, forget), params))
    moved = _moved(model, [gi / (gi.abs() + 1e-8) for gi in g], -1e-2)
    loss = dpo_loss(sequence_logprobs(moved, chosen), sequence_logprobs(moved, rejected), ref_c, ref_r, 0.1)
    expected = [0.1 * t for t in torch.autograd.grad(loss, _params(moved))]
    hook.before_step(model, _encode(loaded, memorise_set(2)))
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(hook._term, expected, strict=True))
    assert float(loss.detach()) != pytest.approx(math.log(2))  # the attack moved the margins
    metrics = hook.pop_metrics()
    assert metrics["tamper_loss"] == pytest.approx(float(loss.detach()), rel=1e-5) and hook.pop_metrics() == {}


def test_tar_dpo_refuses_held_out_sets_that_do_not_pair(tmp_path: Path) -> None:
    from tunesec.defenses.alignment.tar import HELD_OUT, HELD_OUT_REFUSED, TamperResistance
    from tunesec.errors import UsageError

    loaded = make_loaded()
    batch = _encode(loaded, harmful_set(2))
    ctx = _ctx(loaded, {"harmful": batch, HELD_OUT: batch, HELD_OUT_REFUSED: batch})
    ctx.extra_datasets = {HELD_OUT: harmful_set(3), HELD_OUT_REFUSED: harmful_set(2)}
    with pytest.raises(UsageError, match="3 harmful and 2 refused"):
        TamperResistance(tr_loss="dpo").setup(ctx)


def test_tar_dpo_form_takes_the_papers_grad_scale_unless_one_is_given() -> None:
    from tunesec.defenses import get_defense

    assert get_defense("tar").config.tr_scale == 4.0
    assert get_defense("tar", {"tr_loss": "dpo"}).config.tr_scale == 0.1
    assert get_defense("tar", {"tr_loss": "dpo", "tr_scale": 2.0}).config.tr_scale == 2.0


def test_tar_dpo_chosen_answers_are_refusals_without_a_recovery_examples_harmful_prefix() -> None:
    from tunesec.data.schema import Example, Message
    from tunesec.defenses import get_defense
    from tunesec.defenses.alignment.tar import HELD_OUT_REFUSED

    def ex(i: int, kind: str, answer: str, loss_start: int = 0) -> Example:
        turn = Message(role="assistant", content=answer, loss_start=loss_start)
        return Example(id=f"e{i}", messages=[Message(role="user", content=f"q{i}"), turn], meta={"align_kind": kind})

    prefix = "Step 1: get the"
    data = [
        ex(0, "deep-refusal", prefix + "\n\nI can't help with that.", loss_start=len(prefix)),
        ex(1, "refusal", "I won't do that."),
        ex(2, "helpful", "Paris."),
    ]
    tar = get_defense("tar", {"tr_loss": "dpo"})
    chosen = tar.extra_datasets(harmful_set(4), data)[HELD_OUT_REFUSED]
    assert [e.messages[-1].content for e in chosen] == ["I can't help with that.", "I won't do that."]
