"""Train and validate the ``response-judge`` cross-encoder (leave-one-source-out), and write the shipped weights.

Data: the five labelled judge sources (:mod:`tunesec.data.judge_sets`, read from ``--data``/judge) plus auxiliary
pairs that are in no test (the harm classifier's refusal / harmful / benign pairs, :mod:`tunesec.judges.harm_data`),
which give refusal labels when XSTest, the only source with them, is held out. Big sources are subsampled to
``--cap`` rows each (seeded, before any result is seen; disclosed in metrics.json).

Protocol, per held-out source S (``--folds``):
- train on the other sources and the auxiliary pairs, minus every pair whose request also occurs in S (so the
  test has new requests, new responses and, across sources, new responding models) and minus a calibration split
  (prompt bucket < 10 of 100, by request);
- fit one temperature per output on the calibration split;
- score every pair of S over all its response windows, and report accuracy, precision, recall, F1, Cohen's kappa
  and ECE with 95% intervals (harmful on every source; refused on XSTest).
``--final DIR`` then trains on all five sources the same way and writes ``top.safetensors``, ``config.json`` and
``metrics.json`` (the LOSO table, the data files' sha256, the command) into DIR.

The lower encoder layers are frozen, so their outputs are computed once for every window and cached (fp16); each
fold trains only the top layers and the head. Exact command of the shipped weights: docs/JUDGES.md.

    python scripts/train_judge.py --data ../shared/data --out runs/judge-train --final runs/judge-final \
        --cap 2000 --aux-cap 2000 --lr 1e-4
    cp runs/judge-final/* src/tunesec/assets/response_judge/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from tunesec.data.judge_sets import SOURCES, LabelledPair, load_source, prompt_bucket
from tunesec.evals.agreement import agreement
from tunesec.judges.cross_encoder import (
    OUTPUTS,
    CrossEncoderConfig,
    Window,
    aggregate,
    fit_temperature,
    load_model,
    make_windows,
    pad_batch,
)
from tunesec.judges.harm_data import REFUSAL_START, load_items
from tunesec.models.cpu_kernels import cpu_inference

CALIB_BUCKETS = 10


def aux_pairs(data: Path, cap: int, rng: random.Random) -> list[LabelledPair]:
    """Auxiliary training pairs: refusals (those opening with a refusal phrase), harmful answers, benign help."""
    splits, _ = load_items(data, seed=0)
    out = []
    for items in splits.values():
        for it in items:
            if it.label == "refusal":
                if not REFUSAL_START.match(it.response):
                    continue
                out.append(LabelledPair(it.prompt, it.response, False, True, "aux", it.source))
            else:
                out.append(LabelledPair(it.prompt, it.response, it.label == "harmful", False, "aux", it.source))
    rng.shuffle(out)
    return out[:cap]


def cap_rows(pairs: list[LabelledPair], cap: int, rng: random.Random) -> list[LabelledPair]:
    """A seeded sample of at most ``cap`` pairs, in the source's order."""
    if len(pairs) <= cap:
        return pairs
    keep = sorted(rng.sample(range(len(pairs)), cap))
    return [pairs[i] for i in keep]


def assemble(data: Path, cap: int, aux_cap: int, seed: int) -> tuple[list[LabelledPair], dict[str, dict]]:
    """The pairs of every source (each capped to a seeded sample of ``cap``) and the auxiliary pairs, in order."""
    rng = random.Random(seed)
    pairs: list[LabelledPair] = []
    reports = {}
    for s in SOURCES:
        got, rep = load_source(s, data)
        reports[s] = {**rep.__dict__, "capped_to": min(len(got), cap)}
        pairs.extend(cap_rows(got, cap, rng))
    pairs.extend(aux_pairs(data, aux_cap, rng))
    return pairs, reports


def cache_lower(model: torch.nn.Module, tokenizer, windows: list[Window], batch: int) -> list[torch.Tensor]:
    """fp16 hidden states after the frozen layers, one (tokens x hidden) tensor per window."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(windows)
    order = sorted(range(len(windows)), key=lambda k: len(windows[k].input_ids))
    with torch.inference_mode(), cpu_inference(model.encoder), Progress() as bar:
        task = bar.add_task("frozen layers", total=len(windows))
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            b = pad_batch([windows[k] for k in idx], tokenizer.pad_token_id)
            h = model.lower(b["input_ids"], b["token_type_ids"], b["attention_mask"])
            for j, k in enumerate(idx):
                out[k] = h[j, : len(windows[k].input_ids)].to(torch.float16).clone()
            bar.advance(task, len(idx))
    return out


def upper_logits(model, hidden: list[torch.Tensor], idx: list[int], grad: bool) -> torch.Tensor:
    n = max(hidden[k].shape[0] for k in idx)
    d = hidden[idx[0]].shape[1]
    h = torch.zeros(len(idx), n, d)
    mask = torch.zeros(len(idx), n, dtype=torch.long)
    for j, k in enumerate(idx):
        m = hidden[k].shape[0]
        h[j, :m] = hidden[k].float()
        mask[j, :m] = 1
    with torch.set_grad_enabled(grad):
        return model.upper(h, mask)


def batches(idx: list[int], hidden: list[torch.Tensor], size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within chunks of 50 batches, shuffle the batches."""
    idx = idx[:]
    rng.shuffle(idx)
    out = []
    chunk = 50 * size
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda k: hidden[k].shape[0])
        out.extend(part[i : i + size] for i in range(0, len(part), size))
    rng.shuffle(out)
    return out


def train_top(model, init_state, hidden, rows, labels, args, seed: int, desc: str) -> None:
    """Reset the top layers and head to ``init_state`` (head re-drawn with ``seed``) and train them."""
    torch.manual_seed(seed)
    model.load_top_state(init_state)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    torch.nn.init.zeros_(model.head.bias)
    params = model.top_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = random.Random(seed)
    plan = [b for _ in range(args.epochs) for b in batches(rows, hidden, args.batch_size, rng)]
    warm = max(1, len(plan) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (len(plan) - s) / max(1, len(plan) - warm))
    )
    model.train()
    losses = []
    with Progress() as bar:
        task = bar.add_task(desc, total=len(plan))
        for b in plan:
            y = torch.tensor(labels[b], dtype=torch.float32)
            known = ~torch.isnan(y)
            logits = upper_logits(model, hidden, b, grad=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[known], y[known], reduction="sum"
            ) / known.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
            bar.update(task, advance=1, description=f"{desc} loss {np.mean(losses[-50:]):.3f}")
    model.eval()


def window_logits_cached(model, hidden, windows_idx: list[int], batch: int) -> np.ndarray:
    out = np.zeros((len(windows_idx), len(OUTPUTS)), dtype=np.float32)
    order = sorted(range(len(windows_idx)), key=lambda j: hidden[windows_idx[j]].shape[0])
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            part = order[s : s + batch]
            out[part] = upper_logits(model, hidden, [windows_idx[j] for j in part], grad=False).numpy()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True, help="folder for per-fold predictions and the LOSO table")
    ap.add_argument("--final", type=Path, default=None, help="write the weights trained on all sources here")
    ap.add_argument("--folds", default=",".join(SOURCES), help="held-out sources, comma-separated ('' = none)")
    ap.add_argument(
        "--protocol",
        choices=("loso", "within"),
        default="loso",
        help="loso: each fold holds out a source; within: one fold holds out 20%% of every source's requests",
    )
    ap.add_argument("--top-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cap", type=int, default=2500, help="at most this many pairs per source (seeded sample)")
    ap.add_argument("--aux-cap", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out}: exists and is not empty; expected a new folder", file=sys.stderr)
        return 2
    if args.final is not None and args.final.exists() and any(args.final.iterdir()):
        print(f"{args.final}: exists and is not empty; expected a new folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    folds = [f for f in args.folds.split(",") if f]
    t0 = time.time()

    pairs, reports = assemble(args.data, args.cap, args.aux_cap, args.seed)
    print(f"{len(pairs)} pairs: " + ", ".join(f"{s} {sum(p.source == s for p in pairs)}" for s in (*SOURCES, "aux")))

    cfg = CrossEncoderConfig(top_layers=args.top_layers)
    tokenizer, model = load_model(None, cfg)
    init_state = {k: v.clone() for k, v in model.top_state().items()}
    windows = make_windows(tokenizer, [p.prompt for p in pairs], [p.response for p in pairs], cfg)
    first = {w.item: k for k, w in enumerate(windows) if w.index == 0}
    by_item: dict[int, list[int]] = {}
    for k, w in enumerate(windows):
        by_item.setdefault(w.item, []).append(k)
    print(f"{len(windows)} windows; caching the frozen layers ({cfg.top_layers} top layers trained)")
    hidden = cache_lower(model, tokenizer, windows, 64)
    print(f"cached in {time.time() - t0:.0f} s")

    labels = np.full((len(windows), 2), np.nan, dtype=np.float32)
    for i, p in enumerate(pairs):
        k = first[i]
        labels[k] = [
            np.nan if p.harmful is None else float(p.harmful),
            np.nan if p.refused is None else float(p.refused),
        ]
    calib_item = [prompt_bucket(p.prompt) < CALIB_BUCKETS for p in pairs]

    def run(held_out: str | None, test_items: list[int], seed: int) -> tuple[list[float], np.ndarray | None]:
        """Train without ``test_items`` (and any pair sharing their requests), calibrate, score ``test_items``."""
        test_set = set(test_items)
        test_keys = {pairs[i].prompt_key for i in test_items}
        train_rows, cal_items = [], []
        for i, p in enumerate(pairs):
            if i in test_set or p.prompt_key in test_keys:
                continue
            (cal_items if calib_item[i] else train_rows).append(i)
        train_win = [first[i] for i in train_rows]
        train_top(model, init_state, hidden, train_win, labels, args, seed, f"train (held out: {held_out or 'none'})")
        cal_logits = window_logits_cached(model, hidden, [first[i] for i in cal_items], 64)
        temps = []
        for o in range(2):
            y = np.array([labels[first[i], o] for i in cal_items])
            known = ~np.isnan(y)
            # harmful aggregates by max over windows; on the calibration split the first window stands in.
            temps.append(fit_temperature(cal_logits[known, o], y[known]))
        if held_out is None:
            return temps, None
        win_idx = [k for i in test_items for k in by_item[i]]
        logits = window_logits_cached(model, hidden, win_idx, 64)
        sub = [windows[k] for k in win_idx]
        remap = {i: j for j, i in enumerate(test_items)}
        sub = [Window(remap[w.item], w.index, w.input_ids, w.token_type_ids) for w in sub]
        fold_cfg = CrossEncoderConfig(top_layers=cfg.top_layers, temperature=dict(zip(OUTPUTS, temps, strict=True)))
        agg = aggregate(sub, logits, len(test_items), fold_cfg)
        head_only = aggregate(
            [w for w in sub if w.index == 0], logits[[w.index == 0 for w in sub]], len(test_items), fold_cfg
        )
        with (args.out / f"preds-{held_out}.jsonl").open("w", encoding="utf-8") as f:  # held_out: a source or "within"
            for j, i in enumerate(test_items):
                p = pairs[i]
                f.write(
                    json.dumps(
                        {
                            "origin": p.origin,
                            "model": p.model,
                            "harmful": p.harmful,
                            "refused": p.refused,
                            "p_harmful": float(agg[j, 0]),
                            "p_refused": float(agg[j, 1]),
                            "p_harmful_head": float(head_only[j, 0]),
                            "windows": int(agg[j, 2]),
                        }
                    )
                    + "\n"
                )
        return temps, agg

    table: dict[str, dict] = {}
    if args.protocol == "loso":
        plan = [(s, [i for i, p in enumerate(pairs) if p.source == s]) for s in folds]
    else:
        # Within sources, new requests: every source's pairs whose request falls in buckets [10, 30) are the test.
        plan = [
            ("within", [i for i, p in enumerate(pairs) if p.source != "aux" and 10 <= prompt_bucket(p.prompt) < 30])
        ]
    for tag, test_items in plan:
        temps, agg = run(tag, test_items, args.seed)
        assert agg is not None
        for s in SOURCES:
            rows_s = [j for j, i in enumerate(test_items) if pairs[i].source == s]
            if not rows_s:
                continue
            row: dict[str, dict] = {"temperature": dict(zip(OUTPUTS, temps, strict=True))}
            for o, name in enumerate(OUTPUTS):
                keep = [j for j in rows_s if getattr(pairs[test_items[j]], name) is not None]
                if not keep:
                    continue
                lab = [bool(getattr(pairs[test_items[j]], name)) for j in keep]
                a = agreement(lab, [bool(agg[j, o] >= 0.5) for j in keep], [agg[j, o] for j in keep])
                row[name] = a.to_dict()
                print(
                    f"{tag:9s} {s:10s} {name:8s} n={a.n:5d} acc {a.accuracy.fmt()} F1 {a.f1.fmt(False)} "
                    f"kappa {a.kappa.fmt(False)} ECE {a.ece.fmt(False)}",
                    flush=True,
                )
            table[s] = row
        (args.out / f"{args.protocol}.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")

    meta = {
        "trained": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sources": reports,
        "files_sha256": {
            str(p.relative_to(args.data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((args.data / "judge").rglob("*"))
            if p.is_file() and p.suffix in (".csv", ".json")
        },
        args.protocol: table,
    }
    if args.final is not None:
        temps, _ = run(None, [], args.seed)
        args.final.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file(model.top_state(), str(args.final / "top.safetensors"))
        CrossEncoderConfig(
            top_layers=cfg.top_layers,
            temperature=dict(zip(OUTPUTS, temps, strict=True)),
            version=datetime.now(UTC).strftime("%Y-%m-%d"),
        ).save(args.final / "config.json")
        (args.final / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
