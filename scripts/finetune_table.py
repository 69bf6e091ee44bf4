"""Measure the fine-tuning service's controls on SmolLM2-135M (docs/DEFENSES.md, "Fine-tuning service").

The git-disl fine-tuning threat model on the shipped aligned model: the user's data is 1,000 SST-2 examples with
a share p of BeaverTails harmful answers (the official git-disl files, p = 0, 0.05, 0.1, 0.2), 1,000 GSM8K examples
at p = 0.05 (the only GSM8K mix shipped), and Qi et al.'s 100 harmful examples alone (``tunesec attack
harmful-sft --via-service``). Each control (no control, every fine-tuning-stage defense, every repair alone) is
run with 3 training seeds; after each run:

    harmful rate: tunesec eval --task harmfulness --dataset harmful-mix (210 prompts), greedy, 64 new tokens
    FA (fine-tuning accuracy on the user's task): SST-2 most-likely label (200 test sentences) or GSM8K (100)

The plan is fixed before any result is seen. Every step is a tunesec command whose run directory is skipped when
finished and resumed when started, so a killed plan continues where it stopped. The service's own training is the
recipe default (one epoch of the user's rows, LoRA continued from the aligned adapter, lr 5e-4). A repair is
applied with ``tunesec repair`` to the undefended run of the same setting and seed (the service's repair stage
does the same after training the same model, so retraining it per repair would only cost time); its cost column
is the repair's own time.

Usage:
    python scripts/finetune_table.py --plan                # print every command, run nothing
    python scripts/finetune_table.py [--root runs/finetune] [--controls lisa salora ...] [--seeds 0 1 2]
                                     [--settings sst2-p0.1 ...]
    python scripts/finetune_table.py --table               # the markdown table from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNESEC = str(Path(sys.executable).parent / "tunesec")
MODEL = "smollm2-135m-aligned"
MIXED = Path("/work/shared/data/beavertails_mixed_xinykou")
TOKENS = "64"
DEFENSES = ["data-filter", "lisa", "backdoor-align", "safety-mix", "constrained-sft", "salora"]
REPAIRS = ["safelora", "resta", "antidote", "merge-back"]
SETTINGS: list[tuple[str, str, str | None]] = [  # (name, task, data file; None: Qi et al.'s 100 harmful alone)
    ("sst2-p0", "sst2", "sst2/train_merged_n1000_p0.json"),
    ("sst2-p0.05", "sst2", "sst2/train_merged_n1000_p0.05.json"),
    ("sst2-p0.1", "sst2", "sst2/train_merged_n1000_p0.1.json"),
    ("sst2-p0.2", "sst2", "sst2/train_merged_n1000_p0.2.json"),
    ("gsm8k-p0.05", "gsm8k", "gsm8k/train_merged_n1000_p0.05.json"),
    ("qi-harmful-100", "none", None),
]
HARM = ["--task", "harmfulness", "--dataset", "harmful-mix"]
FA = {
    "sst2": ["--task", "utility", "--dataset", "sst2", "--task-option", "scoring=choices", "--limit", "200"],
    "gsm8k": ["--task", "utility", "--dataset", "gsm8k", "--limit", "100"],
}


def finished(run: Path) -> bool:
    """A run directory whose run.json says it finished."""
    spec = run / "run.json"
    return spec.is_file() and json.loads(spec.read_text()).get("status") == "finished"


class Plan:
    """The commands of the plan, run (or only printed, with ``dry``)."""

    def __init__(self, root: Path, dry: bool) -> None:
        self.root, self.dry, self.n = root, dry, 0
        self.log = root / "plan.log"

    def step(self, run: Path, args: list[str], resumable: bool = True) -> None:
        """Run ``args`` into ``run`` unless finished; resume it when it was started (or, for a command that
        cannot resume, move the unfinished directory aside and start again)."""
        if finished(run):
            return
        if run.exists() and not resumable and not self.dry:
            run.rename(run.with_name(f"{run.name}.unfinished-{int(time.time())}"))
        args = [*args, "--resume" if run.exists() else "--out", str(run)]
        self.n += 1
        if self.dry:
            print(" ".join(args))
            return
        run.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with self.log.open("a") as fh:
            fh.write(f"\n$ {' '.join(args)}\n")
            fh.flush()
            rc = subprocess.call(args, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
            fh.write(f"[exit {rc} after {time.time() - started:.0f} s]\n")
        if rc != 0:
            sys.exit(f"failed ({rc}): {' '.join(args)}; see {self.log}")


def recipe(root: Path, control: str, seed: int, dry: bool) -> Path:
    """The service recipe of no control or one fine-tuning-stage defense, and a seed (written once, next to the
    runs; repairs run through ``tunesec repair``)."""
    path = root / "recipes" / f"{control}-seed{seed}.yaml"
    lines = [f"training: {{seed: {seed}}}"]
    if control in DEFENSES:
        lines.append(f"defense: [{control}]")
    if not dry and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def final_spec(run: Path) -> str:
    """What --model takes for the final model of a finished finetune run."""
    ref = json.loads((run / "model_ref.json").read_text())
    return str(ref.get("adapter") or ref["base"])


def run_plan(root: Path, controls: list[str], seeds: list[int], dry: bool, settings: list[str]) -> int:
    plan = Plan(root, dry)
    if not dry:
        root.mkdir(parents=True, exist_ok=True)
    base = root / "aligned"
    plan.step(base / "eval-harm", [TUNESEC, "eval", MODEL, *HARM, "--max-new-tokens", TOKENS])
    for task, args in FA.items():
        if any(t == task and n in settings for n, t, _ in SETTINGS):
            plan.step(base / f"eval-fa-{task}", [TUNESEC, "eval", MODEL, *args, "--max-new-tokens", "256"])
    for name, task, data in SETTINGS:
        if name not in settings:
            continue
        # undefended first: the repairs start from its model
        for control in sorted(controls, key=lambda c: (c != "none", c in REPAIRS)):
            for seed in seeds:
                cell = root / name / control / f"seed{seed}"
                if control in REPAIRS:
                    plain = root / name / "none" / f"seed{seed}" / "finetune"
                    tuned = "TUNED" if dry and not finished(plain) else final_spec(plain)
                    repair = [TUNESEC, "repair", control, "--tuned", tuned, "--aligned", MODEL]
                    plan.step(cell / "finetune", repair, resumable=False)
                    spec = "MODEL" if dry and not finished(cell / "finetune") else final_spec(cell / "finetune")
                    plan.step(cell / "eval-harm", [TUNESEC, "eval", spec, *HARM, "--max-new-tokens", TOKENS])
                    if task in FA:
                        plan.step(cell / "eval-fa", [TUNESEC, "eval", spec, *FA[task], "--max-new-tokens", "256"])
                    continue
                rec = recipe(root, control, seed, dry)
                if data is None:
                    args = [TUNESEC, "attack", "harmful-sft", "--model", MODEL, "--via-service", str(rec)]
                else:
                    args = [TUNESEC, "finetune", "--model", MODEL, "--data", str(MIXED / data), "--recipe", str(rec)]
                plan.step(cell / "finetune", args)
                spec = "MODEL" if dry and not finished(cell / "finetune") else final_spec(cell / "finetune")
                plan.step(cell / "eval-harm", [TUNESEC, "eval", spec, *HARM, "--max-new-tokens", TOKENS])
                if task in FA:
                    plan.step(cell / "eval-fa", [TUNESEC, "eval", spec, *FA[task], "--max-new-tokens", "256"])
    return plan.n


def metric(run: Path, key: str) -> float | None:
    m = metric_value(run, key)
    return None if m is None else float(m["value"])


def metric_value(run: Path, key: str) -> dict | None:
    path = run / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    m = data.get("metrics", data).get(key)
    return None if m is None else dict(m)


def summary(values: list[float], one: dict | None = None) -> str:
    """Mean over seeds with a 95% t-interval (and the number of seeds); with one seed, that run's own 95%
    interval over examples (``one``: its metric); 'not run' when none finished."""
    if not values:
        return "not run"
    mean = statistics.fmean(values)
    if len(values) < 2:
        if one is not None and one.get("ci_low") is not None:
            return f"{100 * mean:.1f} [{100 * one['ci_low']:.1f}, {100 * one['ci_high']:.1f}] (1 seed)"
        return f"{100 * mean:.1f} (1 seed)"
    from scipy.stats import t as student_t

    t = float(student_t.ppf(0.975, len(values) - 1))  # 4.30 at 3 seeds
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return f"{100 * mean:.1f} [{100 * max(mean - half, 0):.1f}, {100 * min(mean + half, 1):.1f}] (n={len(values)})"


def table(root: Path, controls: list[str], seeds: list[int], settings: list[str]) -> str:
    """Harmful rate and FA per setting and control, and the cost relative to no control."""
    rows = [
        "| setting | control | harmful rate % | FA % | train s (relative) |",
        "|---|---|---|---|---|",
    ]
    base = root / "aligned"
    harm0 = metric(base / "eval-harm", "harmful_rate")
    fa0 = {t: metric(base / f"eval-fa-{t}", "accuracy") for t in FA}
    fa0_text = ", ".join(f"{t} {100 * v:.1f}" for t, v in fa0.items() if v is not None) or "not run"
    one0 = metric_value(base / "eval-harm", "harmful_rate")
    rows.append(
        f"| before fine-tuning | {MODEL} | {summary([harm0] if harm0 is not None else [], one0)} | {fa0_text} | |"
    )
    for name, task, _ in SETTINGS:
        if name not in settings:
            continue
        plain: float | None = None
        for control in ["none", *controls]:
            cells = [root / name / control / f"seed{s}" for s in seeds]
            harm = [v for c in cells if (v := metric(c / "eval-harm", "harmful_rate")) is not None]
            fa = [v for c in cells if (v := metric(c / "eval-fa", "accuracy")) is not None]
            secs = []
            for c in cells:
                if not finished(c / "finetune"):
                    continue
                spec = json.loads((c / "finetune" / "run.json").read_text())
                if control in REPAIRS:  # the repair's own time
                    secs.append(float(spec["model"]["provenance"]["seconds"]["total"]))
                else:
                    secs.append(sum(float(s.get("seconds") or 0) for s in spec.get("stages", [])))
            secs = [s for s in secs if s]
            mean_s = statistics.fmean(secs) if secs else None
            if control == "none":
                plain = mean_s
            rel = f" ({mean_s / plain:.2f}x)" if mean_s and plain else ""
            cost = f"{mean_s:.0f}{rel}" if mean_s else "not run"
            one_h = metric_value(cells[0] / "eval-harm", "harmful_rate") if len(harm) == 1 else None
            one_f = metric_value(cells[0] / "eval-fa", "accuracy") if len(fa) == 1 else None
            fa_text = summary(fa, one_f) if task in FA else "n/a"
            rows.append(f"| {name} | {control} | {summary(harm, one_h)} | {fa_text} | {cost} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "finetune")
    p.add_argument("--controls", nargs="*", default=[*DEFENSES, *REPAIRS])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--plan", action="store_true", help="print the commands that are still to run, run nothing")
    p.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    p.add_argument("--settings", nargs="*", default=[n for n, _, _ in SETTINGS], help="settings to run (default all)")
    args = p.parse_args()
    bad = sorted(set(args.settings) - {n for n, _, _ in SETTINGS})
    if bad:
        sys.exit(f"--settings: unknown setting {bad[0]!r}; expected some of {', '.join(n for n, _, _ in SETTINGS)}")
    unknown = sorted(set(args.controls) - {*DEFENSES, *REPAIRS})
    if unknown:
        sys.exit(f"--controls: unknown control {unknown[0]!r}; expected some of {', '.join(DEFENSES + REPAIRS)}")
    if args.table:
        print(table(args.root, args.controls, args.seeds, args.settings))
        return
    n = run_plan(args.root, ["none", *args.controls], args.seeds, dry=args.plan, settings=args.settings)
    if args.plan:
        print(f"# {n} commands to run")


if __name__ == "__main__":
    main()
