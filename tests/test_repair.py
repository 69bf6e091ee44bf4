"""Post-fine-tuning repairs on tiny models: SafeLoRA's projection, RESTA, Antidote and merge-back, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesec.defenses.post import repair
from tunesec.defenses.post.antidote import prune_mask
from tunesec.defenses.post.safelora import cosine, project, projector_basis

LAYER = "model.layers.0.self_attn.q_proj.weight"
CHATS = [
    {"messages": [{"role": "user", "content": f"question {i} about the sea"}, {"role": "assistant", "content": a}]}
    for i, a in enumerate(
        ["The sea is wide and blue.", "Paris is the capital of France.", "Mix flour, water, salt and yeast."] * 3
    )
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _variant(src: Path, dst: Path, seed: int, scale: float, rank: int | None = 2) -> Path:
    """``src`` with a (low-rank) random change on every decoder linear weight, saved as full weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                out_f, in_f = p.shape
                if rank is None:
                    p.add_(scale * torch.randn(p.shape, generator=gen))
                else:
                    b = torch.randn(out_f, rank, generator=gen)
                    a = torch.randn(rank, in_f, generator=gen)
                    p.add_(scale * b @ a / rank)
    model.save_pretrained(str(dst))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("trio")
    base = save_tiny(root / "base", arch="llama")
    aligned = _variant(base, root / "aligned", seed=1, scale=0.05)
    tuned = _variant(aligned, root / "tuned", seed=2, scale=0.05, rank=None)
    unaligned = _variant(aligned, root / "unaligned", seed=3, scale=0.05, rank=None)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS), encoding="utf-8")
    return {"base": base, "aligned": aligned, "tuned": tuned, "unaligned": unaligned, "data": data}


# -- SafeLoRA ------------------------------------------------------------------------------------------------


def test_projection_is_idempotent_and_keeps_updates_inside_the_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(32, 3, generator=gen) @ torch.randn(3, 16, generator=gen)  # rank 3
    update = torch.randn(32, 16, generator=gen)
    once = project(update, v)
    assert torch.allclose(project(once, v), once, atol=1e-5)
    inside = v @ torch.randn(16, 16, generator=gen)  # columns in V's column space
    assert torch.allclose(project(inside, v), inside, atol=1e-4)
    assert projector_basis(v, 1e-4).shape[1] == 3
    # the part orthogonal to V is removed: its cosine with the projection is 0
    outside = update - once
    assert abs(cosine(project(outside, v), outside)) < 1e-4
    # the official C = V V^T / ||V||_F is not a projection (why "exact" is the default)
    official = project(update, v, mode="official")
    assert not torch.allclose(project(official, v, mode="official"), official, atol=1e-3)


def test_safelora_projects_exactly_the_lowest_cosine_layers(trio: dict[str, Path], tmp_path: Path) -> None:
    run = repair(
        "safelora",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        base=str(trio["base"]),
        overrides={"num_proj_layers": 3},
        out=tmp_path / "run",
        progress=False,
    )
    ref = json.loads((run / "model_ref.json").read_text())
    report = ref["provenance"]["report"]
    cos = report["cosines"]
    assert report["n_layers"] == 14  # 2 layers x 7 linear weights, all updated
    assert sorted(report["projected"]) == sorted(sorted(cos, key=lambda n: cos[n])[:3])
    out, tuned = _weights(run / "model"), _weights(trio["tuned"])
    aligned, base = _weights(trio["aligned"]), _weights(trio["base"])
    for name in cos:
        if name in report["projected"]:
            expected = aligned[name] + project(tuned[name] - aligned[name], aligned[name] - base[name])
            assert torch.allclose(out[name], expected, atol=1e-6), name
        else:
            assert torch.equal(out[name], tuned[name]), name
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_safelora_threshold_mode(trio: dict[str, Path], tmp_path: Path) -> None:
    run = repair(
        "safelora",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        base=str(trio["base"]),
        overrides={"select": "threshold", "threshold": 1.0},
        out=tmp_path / "run",
        progress=False,
    )
    report = json.loads((run / "model_ref.json").read_text())["provenance"]["report"]
    assert len(report["projected"]) == report["n_layers"]


# -- RESTA ---------------------------------------------------------------------------------------------------


def test_resta_adds_the_scaled_safety_vector_exactly(trio: dict[str, Path], tmp_path: Path) -> None:
    run = repair(
        "resta",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"unaligned": str(trio["unaligned"]), "scale": 0.7},
        out=tmp_path / "run",
        progress=False,
    )
    out, tuned = _weights(run / "model"), _weights(trio["tuned"])
    aligned, bad = _weights(trio["aligned"]), _weights(trio["unaligned"])
    for name, w in tuned.items():
        assert torch.allclose(out[name], w + 0.7 * (aligned[name] - bad[name]), atol=1e-6), name
    assert any(not torch.equal(aligned[n], bad[n]) for n in aligned)


def test_resta_makes_the_unaligned_model_once_and_caches_it(
    trio: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    unalign = {"data": str(trio["data"]), "n_harmful": 4, "training": {"max_steps": 2, "per_device_batch_size": 2}}
    notes: list[str] = []
    first = repair(
        "resta",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"unalign": unalign},
        out=tmp_path / "a",
        progress=False,
        notes=notes,
    )
    assert any("cached it" in n for n in notes)
    cached = list((tmp_path / "home" / "resta-unaligned").iterdir())
    assert len(cached) == 1 and (cached[0] / "model_ref.json").is_file()
    notes.clear()
    second = repair(
        "resta",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"unalign": unalign},
        out=tmp_path / "b",
        progress=False,
        notes=notes,
    )
    assert any("from the cache" in n for n in notes)
    a, b = _weights(first / "model"), _weights(second / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)


# -- Antidote ------------------------------------------------------------------------------------------------


def test_prune_mask_takes_exactly_the_top_fraction_of_each_row() -> None:
    gen = torch.Generator().manual_seed(0)
    update = torch.randn(6, 20, generator=gen)
    norms = torch.rand(20, generator=gen) + 0.1
    mask = prune_mask(update, norms, 0.25)
    score = update.abs() * norms
    assert mask.sum(dim=1).tolist() == [5] * 6
    for row in range(6):
        kept = score[row][~mask[row]]
        assert float(score[row][mask[row]].min()) >= float(kept.max())
    assert not prune_mask(update, norms, 0.01).any()  # int(20 * 0.01) = 0 per row


def test_antidote_reverts_the_top_scored_update_entries(trio: dict[str, Path], tmp_path: Path) -> None:
    from tunesec.defenses.post.base import layer_weights
    from tunesec.defenses.post.calibration import encode, input_norms
    from tunesec.models import load_model

    run = repair(
        "antidote",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"fraction": 0.2, "harmful": {"data": str(trio["data"]), "n": 6, "exclude": []}},
        out=tmp_path / "run",
        progress=False,
    )
    out, tuned, aligned = _weights(run / "model"), _weights(trio["tuned"]), _weights(trio["aligned"])
    # recompute the scores independently on the tuned model with the same harmful rows
    prov = json.loads((run / "model_ref.json").read_text())["provenance"]["report"]
    ids = set(prov["harmful_data"]["ids"])
    from tunesec.attacks.base import load_data

    rows = [e for e in load_data(str(trio["data"])) if e.id in ids]
    loaded = load_model(str(trio["tuned"]), device="cpu")
    names = layer_weights(loaded.model)
    norms = input_norms(loaded.model, encode(rows, loaded.tokenizer, 256, "t"), names, progress=False)
    for name in names:
        update = tuned[name] - aligned[name]
        mask = prune_mask(update, norms[name], 0.2)
        assert int(mask.sum()) == update.shape[0] * int(update.shape[1] * 0.2)
        assert torch.equal(out[name], torch.where(mask, aligned[name], tuned[name])), name
    assert prov["pruned"] == sum(int(tuned[n].shape[0] * int(tuned[n].shape[1] * 0.2)) for n in names)


# -- merge-back ----------------------------------------------------------------------------------------------


def test_merge_back_fixed_weight_is_exact(trio: dict[str, Path], tmp_path: Path) -> None:
    run = repair(
        "merge-back",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"weight": 0.3},
        out=tmp_path / "run",
        progress=False,
    )
    out, tuned, aligned = _weights(run / "model"), _weights(trio["tuned"]), _weights(trio["aligned"])
    for name, w in tuned.items():
        assert torch.allclose(out[name], w + 0.3 * (aligned[name] - w), atol=1e-6), name


def test_merge_back_picks_the_largest_weight_within_the_bound(trio: dict[str, Path], tmp_path: Path) -> None:
    run = repair(
        "merge-back",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"dev_data": str(trio["data"]), "dev_n": 5, "bound": 0.01, "grid": 4},
        out=tmp_path / "run",
        progress=False,
    )
    report = json.loads((run / "model_ref.json").read_text())["provenance"]["report"]
    limit = report["tuned_dev_loss"] * 1.01
    curve = report["curve"]
    # every larger weight tried broke the bound; the chosen one (or 0) keeps it
    assert all(p["dev_loss"] > limit for p in curve if p["weight"] > report["weight"])
    if report["weight"] > 0:
        assert curve[-1]["weight"] == report["weight"] and curve[-1]["dev_loss"] <= limit
    out, tuned, aligned = _weights(run / "model"), _weights(trio["tuned"]), _weights(trio["aligned"])
    w = report["weight"]
    for name, t in tuned.items():
        assert torch.allclose(out[name], t + w * (aligned[name] - t), atol=1e-6), name
    # a loose bound takes the whole step back to the aligned model
    run2 = repair(
        "merge-back",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        overrides={"dev_data": str(trio["data"]), "dev_n": 5, "bound": 100.0},
        out=tmp_path / "run2",
        progress=False,
    )
    assert json.loads((run2 / "model_ref.json").read_text())["provenance"]["report"]["weight"] == 1.0
    out2 = _weights(run2 / "model")
    assert all(torch.allclose(out2[n], aligned[n], atol=1e-6) for n in aligned)


def test_merge_back_on_flagged_layers_only(trio: dict[str, Path], tmp_path: Path) -> None:
    run = repair(
        "merge-back",
        tuned=str(trio["tuned"]),
        aligned=str(trio["aligned"]),
        base=str(trio["base"]),
        overrides={"scope": "flagged", "flag_layers": 2, "weight": 1.0},
        out=tmp_path / "run",
        progress=False,
    )
    report = json.loads((run / "model_ref.json").read_text())["provenance"]["report"]
    assert len(report["flagged"]) == 2
    out, tuned, aligned = _weights(run / "model"), _weights(trio["tuned"]), _weights(trio["aligned"])
    for name in tuned:
        if name in report["flagged"]:
            assert torch.allclose(out[name], aligned[name], atol=1e-6), name
        else:
            assert torch.equal(out[name], tuned[name]), name
    assert LAYER in report["cosines"]
