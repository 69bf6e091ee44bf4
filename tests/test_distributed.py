"""Training on 2 processes (DDP over gloo, on this CPU) equals training on 1 with the same global batch.

One launch of ``torch.distributed.run`` (what ``accelerate launch`` runs) trains every case in turn; each case is
compared with a 1-process run in this process: the loss of each of 20 optimizer steps and the saved adapter.
The 1-process run accumulates 2 micro-batches of 2 examples per step, the 2 processes take one micro-batch of 2
each, so each micro-batch is the same computation in both and only the reduction of the two gradients differs
(a DDP all-reduce vs ``.grad`` accumulation): float32 is enough for 1e-5 (measured: equal to the last bit on
this CPU, see the assertion messages). A second comparison packs all 4 examples into one micro-batch on one
process (another float32 summation order): that one is compared in float64, where the order costs ~1e-15.

Rank 1 runs under an audit hook that records every file write it attempts (``guard_worker_writes``): it must
attempt none, and the run directory holds what a 1-process run writes plus one RNG state per rank.

Run as a script (``python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py OUT CASES``) it
is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

STEPS = 20
CASES = ["plain", "extra_loss", "vaccine", "booster", "project"]
REL = 1e-5  # on each step's loss (the target)
# on each adapter matrix (max difference / max entry): 20 Adam steps carry float32 rounding of the gradient's sum
# (1e-7) up to 1e-5 (extra_loss) and 2e-4 (Vaccine, whose perturbation is divided by a norm) in a few entries;
# in float64 (test_packed_batch_float64) the adapters agree within 1e-5
WEIGHT_REL = 1e-3


# -- what is trained ------------------------------------------------------------------------------------------


def _examples(n: int = 40) -> list[Any]:
    from test_training_fixtures import memorise_set

    return memorise_set(n)


def _hooks(case: str) -> tuple[list[Any], dict[str, Any] | None]:
    from tunesec.training import TrainingHook

    class LogitPenalty(TrainingHook):
        """extra_loss that depends on the micro-batch (the logits of its assistant positions) and the weights."""

        name = "logit-penalty"

        def extra_loss(self, model: Any, inputs: Any, outputs: Any) -> Any:
            lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
            return 1e-3 * outputs.logits.float().pow(2).mean() + 1e-2 * sum((p**2).sum() for p in lora)

    class DirectionProjection(TrainingHook):
        """project: remove a fixed direction from the output space of every lora_B (a SafeLoRA-like projection)."""

        name = "projection"

        def project(self, model: Any) -> None:
            import torch

            for n, p in model.named_parameters():
                if "lora_B" in n:
                    d = torch.ones(p.shape[0], dtype=p.dtype) / p.shape[0] ** 0.5
                    p -= d[:, None] * (d @ p)[None, :]

    if case == "plain":
        return [], None
    if case == "extra_loss":
        return [LogitPenalty()], None
    if case == "vaccine":
        from tunesec.defenses.alignment.vaccine import HiddenStatePerturbation

        return [HiddenStatePerturbation(rho=2.0)], None
    if case == "booster":
        from tunesec.defenses.alignment.booster import HarmfulStepAttenuation

        return [HarmfulStepAttenuation(lam=5.0, alpha=0.1, batch_size=2)], {"harmful": _examples(12)[::-1]}
    if case == "project":
        return [DirectionProjection()], None
    raise ValueError(case)


def _config(case: str, processes: int, packed: bool = False, **over: Any) -> Any:
    from tunesec.training import TrainConfig

    batch, accum = (2, 1) if processes == 2 else ((4, 1) if packed else (2, 2))
    fields: dict[str, Any] = {
        "max_steps": STEPS,
        "per_device_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "learning_rate": 5e-3,
        "save_steps": 0,
        "seed": 3,
        "lora_dropout": 0.0,
        "check_memory": False,
    }
    fields.update(over)
    return TrainConfig(**fields)


def _train(case: str, out: Path, processes: int, dtype: str = "float32", packed: bool = False, *,
           resume: bool = False, crash_at: int | None = None, **over: Any) -> Any:  # fmt: skip
    import torch

    from test_training_fixtures import make_loaded
    from tunesec.training import TrainingHook, train

    class Kill(TrainingHook):
        """Every process dies (no clean-up, as under kill -9) when step ``crash_at`` starts."""

        name = "kill"

        def setup(self, ctx: Any) -> None:
            self.ctx = ctx

        def before_step(self, model: Any, inputs: Any) -> None:
            if self.ctx.clock.step == crash_at:
                os._exit(9)

    loaded = make_loaded()
    loaded.model.to(getattr(torch, dtype))
    hooks, extra = _hooks(case)
    if crash_at is not None:
        hooks.append(Kill())
    cfg = _config(case, processes, packed, **over)
    return train(loaded, _examples(), cfg, out_dir=out, hooks=hooks, extra_datasets=extra, progress=False,
                 resume=resume)  # fmt: skip


# -- the worker (one rank) ------------------------------------------------------------------------------------


def worker(out: Path, cases: list[str], dtype: str, extra: dict[str, Any]) -> None:
    import torch

    from tunesec.training import distributed

    writes: list[str] = []
    if not distributed.is_main_process():
        distributed.guard_worker_writes(on_write=lambda event, path: writes.append(f"{event} {path}"))
    report: dict[str, Any] = {"rank": distributed.rank(), "cases": {}}
    for case in cases:
        result = _train(case, out / case, 2, dtype, **extra)
        lora = [p.detach().double() for n, p in result.model.named_parameters() if "lora_" in n]
        report["cases"][case] = {
            "losses": result.metrics.losses,
            "checksum": float(sum(float(p.abs().sum()) for p in lora)),
            "tokens": result.metrics.tokens,
            "steps": result.metrics.steps,
        }
        del result
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if not distributed.is_main_process():  # the positive control: a write the hook must see
        (out / "probe").write_text("rank 1 writes this on purpose")
    report["writes"] = writes
    # one write per rank, rank 0 on stdout and rank 1 on stderr, so the two reports cannot interleave
    os.write(1 if distributed.is_main_process() else 2, ("REPORT " + json.dumps(report) + "\n").encode())


# -- the tests ------------------------------------------------------------------------------------------------


def _launch(out: Path, cases: list[str], dtype: str = "float32", extra: dict[str, Any] | None = None,
            env: dict[str, str] | None = None) -> tuple[int, dict[int, dict[str, Any]], str]:  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           str(out), ",".join(cases), dtype, json.dumps(extra or {})]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600, check=False)
    reports = {}
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        if line.startswith("REPORT "):
            rep = json.loads(line[len("REPORT ") :])
            reports[rep["rank"]] = rep
    return proc.returncode, reports, proc.stdout[-3000:] + proc.stderr[-3000:]


def _adapter(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "adapter_model.safetensors"))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    code, reports, log = _launch(out, CASES)
    assert code == 0, log
    assert set(reports) == {0, 1}, log
    return out, reports


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(case: str, two_process_runs: Any, tmp_path: Path) -> None:
    import torch

    out, reports = two_process_runs
    single = _train(case, tmp_path / case, 1)
    ddp = reports[0]["cases"][case]
    assert ddp["steps"] == STEPS and len(ddp["losses"]) == STEPS
    worst = max(_rel(a, b) for a, b in zip(ddp["losses"], single.metrics.losses, strict=True))
    assert worst <= REL, f"{case}: losses differ by {worst:.2e} relative: {ddp['losses']} vs {single.metrics.losses}"
    # every rank recorded the same (global) losses and holds the same weights
    assert reports[1]["cases"][case]["losses"] == ddp["losses"]
    assert reports[1]["cases"][case]["checksum"] == ddp["checksum"]
    assert ddp["tokens"] == single.metrics.tokens
    a, b = _adapter(out / case), _adapter(tmp_path / case)
    assert a.keys() == b.keys()
    for k in a:
        err = float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12))
        assert err <= WEIGHT_REL, f"{case}: {k} differs by {err:.2e} relative"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k), "nothing trained"


def test_no_rank_but_zero_writes(two_process_runs: Any, tmp_path: Path) -> None:
    out, reports = two_process_runs
    probe = out / "probe"
    assert reports[1]["writes"] == [f"open {probe.resolve()}"], reports[1]["writes"]  # the probe, and only it
    probe.unlink()
    # one run directory per case, holding what one process writes (rng states: one file per rank instead of one)
    assert sorted(p.name for p in out.iterdir()) == sorted(CASES)
    single = tmp_path / "plain"
    _train("plain", single, 1)
    assert _files(out / "plain") == _files(single)


def test_packed_batch_float64(tmp_path: Path) -> None:
    """One micro-batch of 4 on one process vs 2 x 2 on two processes: float64 makes the summation order moot."""
    code, reports, log = _launch(tmp_path / "ddp", ["plain"], dtype="float64")
    assert code == 0, log
    single = _train("plain", tmp_path / "one", 1, dtype="float64", packed=True)
    ddp = reports[0]["cases"]["plain"]["losses"]
    worst = max(_rel(a, b) for a, b in zip(ddp, single.metrics.losses, strict=True))
    assert worst <= REL, f"losses differ by {worst:.2e} relative"
    a, b = _adapter(tmp_path / "ddp" / "plain"), _adapter(tmp_path / "one")
    for k in a:
        err = float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12))
        assert err <= REL, f"{k} differs by {err:.2e} relative"


def test_resume_after_kill(two_process_runs: Any, tmp_path: Path) -> None:
    """Both processes die at step 13; a new launch resumes from checkpoint-10 to the uninterrupted weights."""
    out, reports = two_process_runs
    run = tmp_path / "ddp"
    code, _, log = _launch(run, ["plain"], extra={"save_steps": 5, "crash_at": 13})
    assert code != 0
    ckpt = run / "plain" / "checkpoints" / "checkpoint-10"
    assert (ckpt / "trainer_state.json").is_file(), log
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not (run / "plain" / "model").exists()
    code, resumed, log = _launch(run, ["plain"], extra={"save_steps": 5, "resume": True})
    assert code == 0, log
    assert resumed[0]["cases"]["plain"]["losses"] == reports[0]["cases"]["plain"]["losses"][10:]
    assert resumed[1]["writes"] == [f"open {(run / 'probe').resolve()}"]
    a, b = _adapter(run / "plain"), _adapter(out / "plain")
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= WEIGHT_REL * float(b[k].abs().max()), k


# -- the command line: --processes N ----------------------------------------------------------------------------


def _chats(path: Path, n: int) -> Path:
    answer = {"role": "assistant", "content": "Mix flour, water, salt and yeast."}
    rows = [{"messages": [{"role": "user", "content": f"How do I bake bread {i}?"}, answer]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_processes_two(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``tunesec attack ... --processes 2``: one run directory (rank 0's), rank 1 trains and writes nothing."""
    from tunesec.cli.main import main

    data = _chats(tmp_path / "data.jsonl", 8)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TUNESEC_DEBUG_WORKERS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data), "--processes", "2",
                 "--set", "n_harmful=8", "--set", "training.max_steps=3", "--set", "training.per_device_batch_size=2",
                 "--set", "training.save_steps=2", "--set", "training.max_seq_len=256"])  # fmt: skip
    captured = capfd.readouterr()
    assert code == 0, captured.err
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in work.iterdir()) == ["runs"], runs
    run = runs[0]
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished"
    assert (run / "model" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-2").glob("rng_state_*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]  # fmt: skip
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["losses"]) == 3
    # rank 1 trained, then ended at its first write (rank 0's provenance), which it did not make
    ended = [line for line in captured.err.splitlines() if line.startswith("rank 1: training done")]
    assert len(ended) == 1, captured.err
    assert str(run.resolve()) in ended[0]
    assert captured.out.strip().splitlines()[-1] == str((run / "model").resolve())


def test_cli_defend_processes_two(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``tunesec defend vaccine ... --processes 2``: the training mix is built by rank 0 and read by rank 1."""
    from tunesec.cli.main import main

    refusals = _chats(tmp_path / "ref.jsonl", 6)
    helpful = _chats(tmp_path / "help.jsonl", 6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
rho: 1.5
alignment:
  refusal_data: {{{refusals}: 4}}
  benign_data: {{{helpful}: 4}}
  self_distill: {{}}
  exclude_eval: []
  training: {{max_steps: 2, per_device_batch_size: 2, max_seq_len: 128, save_steps: 1}}
""")
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNESEC_DEBUG_WORKERS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    code = main(["defend", "vaccine", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out),
                 "--processes", "2"])  # fmt: skip
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "model" / "adapter_model.safetensors").is_file() and (out / "alignment_data.jsonl").is_file()
    assert len([ln for ln in captured.err.splitlines() if ln.startswith("rank 1: training done")]) == 1, captured.err


def _one_line_exit_2(code: int, err: str, pattern: str) -> None:
    import re

    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and re.search(pattern, lines[0]), lines[0]


def test_processes_beyond_the_machine(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from tunesec.cli.main import main
    from tunesec.training.distributed import available_slots

    monkeypatch.chdir(tmp_path)
    data = _chats(tmp_path / "data.jsonl", 4)
    n = available_slots()[0] + 1
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data),
                 "--processes", str(n)])  # fmt: skip
    _one_line_exit_2(code, capfd.readouterr().err, rf"--processes {n}: this machine has \d+ (CPU cores|CUDA devices)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_fsdp_refused_where_it_cannot_shard(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from tunesec.cli.main import main
    from tunesec.errors import UsageError

    monkeypatch.chdir(tmp_path)
    data = _chats(tmp_path / "data.jsonl", 4)
    code = main(["attack", "harmful-sft", "--model", str(tiny_llama_dir), "--data", str(data), "--out", "run",
                 "--set", "n_harmful=4", "--set", "training.fsdp=true"])  # fmt: skip
    _one_line_exit_2(code, capfd.readouterr().err, r"training\.fsdp: FSDP shards over CUDA devices")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # the empty run was discarded
    # hooks read and edit whole weights: FSDP would hand them shards
    with pytest.raises(UsageError, match=r"training\.fsdp: hooks \(vaccine\)"):
        _train("vaccine", tmp_path / "v", 1, fsdp=True)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], json.loads(sys.argv[4]))
