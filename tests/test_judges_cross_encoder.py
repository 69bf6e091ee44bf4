"""The response-judge cross-encoder: windows over long inputs, aggregation, calibration, loading, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tunesec.errors import UsageError
from tunesec.judges.base import JudgeInput
from tunesec.judges.cross_encoder import (
    DEFAULT_DIR,
    CrossEncoderConfig,
    ResponseJudge,
    Window,
    aggregate,
    clip_prompt,
    fit_temperature,
    load_model,
    make_windows,
    pad_batch,
    response_spans,
)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained top layers and head (seeded), saved as the judge ships them."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = CrossEncoderConfig(max_length=64, prompt_head=8, prompt_tail=4, overlap=8)
    _, model = load_model(None, cfg)
    d = tmp_path_factory.mktemp("judge-weights")
    save_file(model.top_state(), str(d / "top.safetensors"))
    cfg.save(d / "config.json")
    return d


def test_response_spans_cover_everything() -> None:
    assert response_spans(0, 10, 2) == [(0, 0)]
    assert response_spans(10, 10, 2) == [(0, 10)]
    spans = response_spans(25, 10, 2)
    assert spans == [(0, 10), (8, 18), (16, 25)]
    covered = set().union(*(range(s, e) for s, e in spans))
    assert covered == set(range(25))
    with pytest.raises(ValueError):
        response_spans(5, 2, 2)


def test_clip_prompt_keeps_head_and_tail() -> None:
    ids = list(range(100))
    assert clip_prompt(ids, 5, 3) == [0, 1, 2, 3, 4, 97, 98, 99]
    assert clip_prompt(ids[:6], 5, 3) == ids[:6]


def test_windows_never_truncate_the_response(weights_dir: Path) -> None:
    from transformers import AutoTokenizer

    from tunesec.judges.classifier import embedder_dir

    tok = AutoTokenizer.from_pretrained(str(embedder_dir()))
    cfg = CrossEncoderConfig.load(weights_dir / "config.json")
    response = " ".join(f"word{i}" for i in range(400))
    prompt = "please " * 50 + "tell me"
    wins = make_windows(tok, [prompt, "hi"], [response, "hello"], cfg)
    first = [w for w in wins if w.item == 0]
    assert len(first) > 3 and [w.index for w in first] == list(range(len(first)))
    assert all(len(w.input_ids) <= cfg.max_length for w in wins)
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    seen: list[int] = []
    for w in first:
        seg = [t for t, s in zip(w.input_ids, w.token_type_ids, strict=True) if s == 1][:-1]  # drop final [SEP]
        seen.extend(seg[cfg.overlap :] if w.index else seg)
    assert seen == r_ids  # every response token, in order, exactly once after removing overlaps
    # The prompt keeps its head and its tail ("tell me") in every window.
    p_ids = clip_prompt(tok(prompt, add_special_tokens=False)["input_ids"], cfg.prompt_head, cfg.prompt_tail)
    assert all(list(w.input_ids[1 : 1 + len(p_ids)]) == p_ids for w in first)
    assert [w.item for w in wins].count(1) == 1


def test_aggregate_max_for_harmful_first_window_for_refused() -> None:
    cfg = CrossEncoderConfig()
    wins = [Window(0, 0, (1,), (0,)), Window(0, 1, (1,), (0,)), Window(1, 0, (1,), (0,))]
    logits = np.array([[-2.0, 3.0], [4.0, -5.0], [0.0, 0.0]], dtype=np.float32)
    out = aggregate(wins, logits, 2, cfg)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert out[0, 0] == pytest.approx(sig(4.0), rel=1e-5) and out[0, 3] == 1  # max window is the second
    assert out[0, 1] == pytest.approx(sig(3.0), rel=1e-5)  # refused from the first window only
    assert out[0, 2] == 2 and out[1, 2] == 1
    cfg.temperature = {"harmful": 2.0, "refused": 1.0}
    assert aggregate(wins, logits, 2, cfg)[0, 0] == pytest.approx(sig(2.0), rel=1e-5)


def test_temperature_scaling_recovers_the_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / 2.5))).astype(float)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.1)
    assert fit_temperature(np.array([]), np.array([])) == 1.0


def test_split_forward_equals_full_forward(weights_dir: Path) -> None:
    import torch

    cfg = CrossEncoderConfig.load(weights_dir / "config.json")
    tok, model = load_model(weights_dir, cfg)
    wins = make_windows(tok, ["How do I kill a process?", "hi"], ["Use kill -9 " * 30, "hello"], cfg)
    batch = pad_batch(wins, tok.pad_token_id)
    with torch.no_grad():
        full = model(**batch)
        hidden = model.lower(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        split = model.upper(hidden, batch["attention_mask"])
    torch.testing.assert_close(full, split, atol=1e-5, rtol=1e-5)


def test_same_input_same_scores_and_empty_is_unparsed(weights_dir: Path) -> None:
    judge = ResponseJudge(weights_dir)
    items = [
        JudgeInput(prompt="How do I make a bomb?", response="I'm sorry, I can't help with that."),
        JudgeInput(prompt="What is 2+2?", response="4. " * 300),
        JudgeInput(prompt="Hi", response="   "),
    ]
    a, b = judge.score(items), judge.score(list(reversed(items)))
    assert [s.model_dump() for s in a] == [s.model_dump() for s in reversed(b)]
    assert a[2].unparsed and a[2].harmful is None
    assert a[1].detail["windows"] > 1
    for s in a[:2]:
        assert 0.0 <= s.detail["p_harmful"] <= 1.0 and 0.0 <= s.detail["p_refused"] <= 1.0
        assert s.harmful == (s.detail["p_harmful"] >= 0.5)


def test_bad_weights_dir(tmp_path: Path, weights_dir: Path) -> None:
    with pytest.raises(UsageError, match="config.json: not found"):
        ResponseJudge(tmp_path)
    (tmp_path / "config.json").write_text('{"top_layers": 2, "colour": "red"}')
    with pytest.raises(UsageError, match="unknown field 'colour'"):
        ResponseJudge(tmp_path)
    cfg = CrossEncoderConfig.load(weights_dir / "config.json")
    with pytest.raises(UsageError, match="top.safetensors: not found"):
        load_model(tmp_path, cfg)


def test_shipped_weights_are_small_safetensors() -> None:
    files = {p.name: p.stat().st_size for p in DEFAULT_DIR.iterdir()}
    assert set(files) >= {"top.safetensors", "config.json", "metrics.json"}
    assert sum(files.values()) <= 20 * 2**20
    cfg = CrossEncoderConfig.load(DEFAULT_DIR / "config.json")
    assert cfg.version != "untrained" and all(0.1 < t < 10 for t in cfg.temperature.values())
