"""The second judge backbone under the same leave-one-source-out protocol: MiniLM pair embeddings + logistic heads.

The bi-encoder is the old ``harm-classifier``'s representation (all-MiniLM-L6-v2 sentence embeddings of the
request and of the response, each truncated to 128 tokens, concatenated with their product), retrained here on the
same pairs, folds, calibration split and temperature scaling as ``scripts/train_judge.py``'s cross-encoder, so the
two backbones differ only in how they read the pair. Heads: one logistic regression per output (L2 1e-3,
full-batch L-BFGS). Prints the per-source table and writes ``backbone-biencoder.json`` into ``--out``.

    python scripts/judge_backbones.py --data ../shared/data --out runs/judge-train
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from train_judge import CALIB_BUCKETS, assemble

from tunesec.data.judge_sets import SOURCES, prompt_bucket
from tunesec.evals.agreement import agreement
from tunesec.judges.classifier import featurize, get_embedder
from tunesec.judges.cross_encoder import OUTPUTS, fit_temperature, sigmoid


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, float]:
    xt, yt = torch.tensor(x), torch.tensor(y)
    w = torch.zeros(x.shape[1], requires_grad=True, dtype=torch.float32)
    b = torch.zeros(1, requires_grad=True, dtype=torch.float32)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cap", type=int, default=2000)
    ap.add_argument("--aux-cap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs, _ = assemble(args.data, args.cap, args.aux_cap, args.seed)
    x = featurize(get_embedder(), [p.prompt for p in pairs], [p.response for p in pairs], "pair", 128)
    labels = np.array([[np.nan if v is None else float(v) for v in (p.harmful, p.refused)] for p in pairs])
    calib = np.array([prompt_bucket(p.prompt) < CALIB_BUCKETS for p in pairs])
    table: dict[str, dict] = {}
    for s in SOURCES:
        keys = {p.prompt_key for p in pairs if p.source == s}
        test = np.array([p.source == s for p in pairs])
        out_of_fold = np.array([p.source != s and p.prompt_key not in keys for p in pairs])
        train, cal = out_of_fold & ~calib, out_of_fold & calib
        row = {}
        for o, name in enumerate(OUTPUTS):
            known = ~np.isnan(labels[:, o])
            w, b = fit_logistic(x[train & known], labels[train & known, o].astype(np.float32))
            t = fit_temperature(x[cal & known] @ w + b, labels[cal & known, o])
            sel = test & known
            if not sel.any():
                continue
            prob = sigmoid((x[sel] @ w + b) / t)
            a = agreement(list(labels[sel, o].astype(bool)), list(prob >= 0.5), list(prob))
            row[name] = a.to_dict()
            print(f"{s:10s} {name:8s} n={a.n:5d} acc {a.accuracy.fmt()} F1 {a.f1.fmt(False)} "
                  f"kappa {a.kappa.fmt(False)} ECE {a.ece.fmt(False)}", flush=True)  # fmt: skip
        table[s] = row
    (args.out / "backbone-biencoder.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
