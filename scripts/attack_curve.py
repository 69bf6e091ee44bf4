"""Harmful rate against attack steps: is a defense robust for 50 steps and gone at 150?

Runs one fine-tuning attack for ``--mult`` times its default length with a checkpoint every ``--every`` steps
(all kept), then evaluates every checkpoint (and the starting model, step 0) on a harmful set with the default
judge. Writes ``curve.json`` (step -> harmful and refusal rates with 95% intervals) and ``curve.png`` into
``--out``; ``--plot A/curve.json B/curve.json ...`` draws several curves in one figure. Each step is a tunesec
command whose run directory is kept, so a killed run continues where it stopped.

Usage:
    python scripts/attack_curve.py --model runs/defenses/booster/defend/model --out runs/curves/booster
    python scripts/attack_curve.py --plot runs/curves/*/curve.json --out runs/curves/all.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNESEC = str(Path(sys.executable).parent / "tunesec")


def finished(run: Path) -> bool:
    spec = run / "run.json"
    return spec.is_file() and json.loads(spec.read_text()).get("status") == "finished"


def call(args: list[str], run: Path) -> None:
    if finished(run):
        return
    args = [*args, "--resume", str(run)] if run.exists() else [*args, "--out", str(run)]
    if subprocess.call(args, cwd=ROOT) != 0:
        sys.exit(f"failed: {' '.join(args)}")


def default_steps(attack: str, model: str) -> int:
    """Optimizer steps of the attack's default run (its epochs over its data at its batch size)."""
    import math

    from tunesec.attacks import get_attack

    a = get_attack(attack)
    examples, _ = a.prepare(None)
    t = a.config.training
    if t.max_steps is not None:
        return int(t.max_steps)
    return math.ceil(len(examples) / t.total_batch_size()) * math.ceil(t.num_epochs)


def curve(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.mult * default_steps(args.attack, args.model)
    attack = out / "attack"
    call(
        [TUNESEC, "attack", args.attack, "--model", args.model, "--set", f"training.max_steps={steps}",
         "--set", f"training.save_steps={args.every}", "--set", "training.save_total_limit=null"],
        attack,
    )  # fmt: skip
    ckpts = sorted((attack / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    points = [(0, args.model)] + [(int(c.name.split("-")[1]), str(c)) for c in ckpts]
    rows = []
    for step, spec in points:
        run = out / f"eval-step-{step}"
        cmd = [TUNESEC, "eval", spec, "--task", "harmfulness", "--dataset", args.dataset, "--max-new-tokens", "64"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        call(cmd, run)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics = metrics.get("metrics", metrics)
        rows.append({"step": step, "harmful_rate": metrics["harmful_rate"], "refusal_rate": metrics["refusal_rate"]})
    result = {"model": args.model, "attack": args.attack, "dataset": args.dataset, "limit": args.limit, "points": rows}
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    plot([out / "curve.json"], out / "curve.png")
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")


def plot(files: list[Path], target: Path, labels: list[str] | None = None) -> None:
    """Harmful rate (with its interval band) against attack steps, one line per curve file.

    Lines are named by ``labels`` (in file order) or else by each file's folder.
    """
    if labels is not None and len(labels) != len(files):
        sys.exit(f"--labels: {len(labels)} names for {len(files)} curve files")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, f in enumerate(files):
        data = json.loads(Path(f).read_text())
        pts = data["points"]
        x = [p["step"] for p in pts]
        ax.plot(x, [p["harmful_rate"]["value"] for p in pts], marker="o", label=labels[i] if labels else Path(f).parent.name)
        ax.fill_between(
            x, [p["harmful_rate"]["ci_low"] for p in pts], [p["harmful_rate"]["ci_high"] for p in pts], alpha=0.15
        )
    ax.set_xlabel("attack optimizer steps")
    ax.set_ylabel("harmful rate (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model to attack (alias, directory or adapter)")
    p.add_argument("--attack", default="harmful-sft")
    p.add_argument("--mult", type=int, default=3, help="attack length as a multiple of its default")
    p.add_argument("--every", type=int, default=10, help="checkpoint (and evaluate) every N steps")
    p.add_argument("--dataset", default="harmful-mix")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", nargs="+", type=Path, help="curve.json files to draw together into --out (a .png)")
    p.add_argument("--labels", nargs="+", help="with --plot: one legend name per curve file, in order")
    args = p.parse_args()
    if args.plot:
        plot(args.plot, Path(args.out), args.labels)
        return
    if not args.model:
        sys.exit("--model is required (or --plot)")
    curve(args)


if __name__ == "__main__":
    main()
