"""Train the ``harm-classifier`` head on the public datasets in ../shared/data and ship it.

Classes (``tunesec.judges.classifier.LABELS``):
  refusal  - harmful instruction + safe answer/refusal (safety_tuned_llamas safety_only_data_Instructions.json),
             plus hard cases: BeaverTails harmful questions + a refusal, benign Alpaca prompts + a refusal
             (over-refusal is not harm);
  harmful  - BeaverTails harmful question + harmful answer (beavertails_mixed_xinykou sst2 p0.2, flag=="unsafe",
             Alpaca template stripped);
  benign   - Alpaca (alpaca_data_1k.json), Dolly (dolly.jsonl), plus short task answers (SST-2 rows of the same
             mix, flag=="finetune") and GSM8K train answers.

Split by prompt (sha256 of the normalised prompt -> train 70 / val 15 / test 15), so no prompt crosses splits;
the refusals used for the hard cases are drawn from the same split's refusal pool. Candidate feature kinds
(pair/joint) and heads (softmax regression / MLP, weight decay) are chosen on val balanced accuracy; the chosen
head is refit on train+val and evaluated once on test. Outputs: head.safetensors, config.json, metrics.json in
src/tunesec/assets/harm_classifier/.

Usage: .venv/bin/python scripts/train_harm_classifier.py [--data ../shared/data] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from tunesec.judges.classifier import (
    EMBEDDER_NAME,
    EMBEDDER_PACKAGE,
    LABELS,
    FeatureKind,
    Head,
    featurize,
    get_embedder,
)
from tunesec.judges.harm_data import load_items
from tunesec.store.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "src" / "tunesec" / "assets" / "harm_classifier"


def train_head(x: np.ndarray, y: np.ndarray, hidden: int, weight_decay: float, seed: int, epochs: int = 300) -> Head:
    """Class-balanced softmax regression (hidden=0) or one-hidden-layer MLP, full-batch AdamW."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y).long()
    counts = torch.bincount(yt, minlength=len(LABELS)).float()
    weights = counts.sum() / (len(LABELS) * counts.clamp(min=1))
    layers: list[torch.nn.Module]
    if hidden:
        layers = [torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(LABELS))]
    else:
        layers = [torch.nn.Linear(x.shape[1], len(LABELS))]
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    return Head([m.weight.detach().numpy() for m in linears], [m.bias.detach().numpy() for m in linears])


def evaluate(y: np.ndarray, pred: np.ndarray) -> dict[str, object]:
    k = len(LABELS)
    cm = np.zeros((k, k), dtype=int)
    for t, p in zip(y, pred, strict=True):
        cm[t, p] += 1
    per_class = {}
    for i, name in enumerate(LABELS):
        tp = cm[i, i]
        prec = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        rec = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[name] = {
            "precision": round(float(prec), 4),
            "recall": round(float(rec), 4),
            "f1": round(float(f1), 4),
            "support": int(cm[i, :].sum()),
        }
    return {
        "n": int(len(y)),
        "accuracy": round(float((y == pred).mean()), 4),
        "balanced_accuracy": round(float(np.mean([per_class[n]["recall"] for n in LABELS])), 4),
        "per_class": per_class,
        "confusion_matrix": {"rows_true_cols_pred": list(LABELS), "matrix": cm.tolist()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    splits, hashes = load_items(args.data, args.seed)
    for name, items in splits.items():
        counts = {lab: sum(it.label == lab for it in items) for lab in LABELS}
        print(f"{name}: {len(items)} items {counts}")
    prompts = {s: {it.prompt for it in items} for s, items in splits.items()}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["val"] & prompts["test"])

    emb = get_embedder()
    emb.batch_size = 32
    feats: dict[str, dict[str, np.ndarray]] = {}
    ys = {s: np.array([LABELS.index(it.label) for it in items]) for s, items in splits.items()}
    kinds: tuple[FeatureKind, ...] = ("pair", "joint")
    for kind in kinds:
        t0 = time.perf_counter()
        feats[kind] = {
            s: featurize(emb, [i.prompt for i in items], [i.response for i in items], kind, args.max_tokens)
            for s, items in splits.items()
        }
        print(f"features {kind}: {time.perf_counter() - t0:.1f}s")

    candidates: list[dict[str, Any]] = []
    for kind in kinds:
        for hidden in (0, 128):
            for wd in (1e-4, 1e-2, 1e-1):
                head = train_head(feats[kind]["train"], ys["train"], hidden, wd, args.seed)
                m = evaluate(ys["val"], head.predict_proba(feats[kind]["val"]).argmax(1))
                row = {
                    "features": kind,
                    "hidden": hidden,
                    "weight_decay": wd,
                    **{k: m[k] for k in ("accuracy", "balanced_accuracy")},
                }
                candidates.append(row)
                print("val", row)
    best = max(candidates, key=lambda r: (r["balanced_accuracy"], r["accuracy"], -r["hidden"]))
    print("chosen", best)
    kind, hidden, wd = best["features"], int(best["hidden"]), float(best["weight_decay"])
    x_fit = np.concatenate([feats[kind]["train"], feats[kind]["val"]])
    y_fit = np.concatenate([ys["train"], ys["val"]])
    head = train_head(x_fit, y_fit, hidden, wd, args.seed)
    test_metrics = evaluate(ys["test"], head.predict_proba(feats[kind]["test"]).argmax(1))
    # Per-source accuracy on test: shows which hard cases the head gets right.
    pred = head.predict_proba(feats[kind]["test"]).argmax(1)
    by_source: dict[str, dict[str, float]] = {}
    for src in sorted({it.source for it in splits["test"]}):
        idx = [i for i, it in enumerate(splits["test"]) if it.source == src]
        by_source[src] = {"n": len(idx), "accuracy": round(float((pred[idx] == ys["test"][idx]).mean()), 4)}
    print(json.dumps(test_metrics, indent=2))
    print(json.dumps(by_source, indent=2))

    today = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(head.tensors(), str(args.out / "head.safetensors"))
    config = {
        "version": f"{today}-{kind}-{'mlp' + str(hidden) if hidden else 'linear'}",
        "embedder": EMBEDDER_NAME,
        "embedder_package": EMBEDDER_PACKAGE,
        "pooling": "mean over non-padding tokens, L2-normalised",
        "features": kind,
        "max_tokens": args.max_tokens,
        "labels": list(LABELS),
        "head": {
            "hidden": hidden,
            "weight_decay": wd,
            "optimizer": "AdamW lr=1e-2 full-batch 300 steps",
            "loss": "class-balanced cross-entropy",
        },
        "split": "sha256(normalised prompt) % 100: train <70, val <85, test rest; final head fit on train+val",
        "training_data_sha256": hashes,
        "seed": args.seed,
        "date": today,
    }
    atomic_write_json(args.out / "config.json", config)
    atomic_write_json(
        args.out / "metrics.json",
        {
            "date": today,
            "machine": f"{platform.platform()} ({platform.processor() or platform.machine()})",
            "split_sizes": {s: {lab: int((ys[s] == i).sum()) for i, lab in enumerate(LABELS)} for s in ys},
            "validation_candidates": candidates,
            "chosen": best,
            "test": test_metrics,
            "test_accuracy_by_source": by_source,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
