"""Several training processes: who writes, how ranks agree, and how a command is launched on N processes.

tunesec trains with transformers' ``Trainer``, which accelerate distributes: under ``accelerate launch`` (or
``torchrun``, or ``tunesec ... --processes N``) every process runs the same command, the Trainer wraps the model
in DDP (gloo on CPUs, NCCL on GPUs) and each process trains on its share of every batch. This module holds what
tunesec adds on top:

- **rank and world size** from the launcher's environment (``RANK``, ``WORLD_SIZE``), readable before any
  process group exists, and the process group itself (accelerate's ``PartialState``) when a command needs to
  talk to the other ranks before the Trainer starts;
- **rank 0 writes, the others only train**: a launched command runs on rank 0 as it would alone (run
  directory, data mix, checkpoints, provenance, evaluation). The other ranks (the *workers*) wait until rank 0
  reaches training, then replay the command's preparation, reading what rank 0 wrote (the run directory, the
  training mix), train with rank 0, and end at the first file write they would make after training. A write
  by a worker before that is a bug and stops the command. :func:`guard_worker_writes` enforces this with a
  Python audit hook (``sys.addaudithook``), so no code path can write behind the engine's back;
- **the relaunch** behind ``--processes N``: the same command line under ``python -m torch.distributed.run``
  (what ``accelerate launch`` runs for multi-GPU jobs), with the count checked against the devices first.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError

# Workers wait for rank 0 to prepare the command's data (which may include generating a self-distilled mix).
WAIT_FOR_MAIN = timedelta(hours=12)
PROCESSES_ENV = "TUNESEC_LAUNCHED"  # set by --processes, so the relaunched command does not relaunch again

_state: dict[str, Any] = {"released": False, "run_path": None, "trained": False, "mode": None, "argv": None}


def set_argv(argv: Sequence[str]) -> None:
    """The CLI records its arguments, so ``--processes N`` can run the same command on N processes."""
    _state["argv"] = list(argv)


def argv() -> list[str]:
    """The arguments of the running CLI command (as given to ``tunesec``)."""
    return list(_state.get("argv") or [])


def processes_option(n: int) -> None:
    """``--processes N`` of a training command: with N > 1, run the same command on N processes and exit."""
    if n == 1 or os.environ.get(PROCESSES_ENV) == "1" and is_launched():
        return
    import typer

    raise typer.Exit(relaunch(n, argv()))


def world_size() -> int:
    """How many training processes the launcher started (1 when not launched)."""
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (its GPU index)."""
    return _env_int("LOCAL_RANK", 0)


def is_launched() -> bool:
    """Whether this process is one of several started by a launcher (accelerate launch, torchrun)."""
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and shows progress."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UsageError(f"${name}: expected an integer (set by the launcher), got {value!r}") from None


def init_process_group() -> None:
    """Start the process group (accelerate's shared state) if launched and not yet started; a no-op otherwise."""
    if not is_launched():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(timeout=WAIT_FOR_MAIN)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself when not launched)."""
    if not is_launched():
        return obj
    init_process_group()
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank is here (no-op when not launched)."""
    if not is_launched():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensors: Sequence[Any]) -> None:
    """Average tensors across ranks in place (one flat all-reduce; no-op when not launched)."""
    if not is_launched() or not tensors:
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).float() if t.dtype in (torch.float16, torch.bfloat16) else t.reshape(-1)
                      for t in tensors])  # fmt: skip
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def all_reduce_sum(value: float) -> float:
    """The sum of a number over ranks (the number itself when not launched)."""
    if not is_launched():
        return value
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


# -- a launched command: rank 0 first, the workers after it, and only rank 0 writes --------------------------


def start_command() -> None:
    """Called by the CLI before a command runs: workers wait for rank 0 to reach training, and may not write.

    Rank 0 runs the command at once. Each worker blocks until rank 0 calls :func:`release_workers` (at the start
    of its first training, or when its command ends without training), then runs the command itself with a
    write guard (:func:`guard_worker_writes`). When rank 0's command ended without training, the workers end
    too (exit 0).
    """
    if not is_launched():
        return
    _state["mode"] = "cli"
    init_process_group()
    if is_main_process():
        return
    guard_worker_writes()
    payload = broadcast(None)
    _state["released"] = True
    if not isinstance(payload, dict) or payload.get("done"):
        _quiet_exit()
    _state["run_path"] = payload.get("run_path")


def set_run_path(path: str | Path) -> None:
    """Rank 0 records the run directory it made; the workers receive it when they are released."""
    _state["run_path"] = str(path)


def main_run_path() -> Path | None:
    """On a worker of a launched command: rank 0's run directory (``None`` elsewhere)."""
    if is_launched() and not is_main_process() and _state["run_path"] is not None:
        return Path(_state["run_path"])
    return None


def release_workers(*, done: bool = False) -> None:
    """Rank 0 of a launched command: let the workers start (once); ``done`` tells them there is nothing to do."""
    if not is_launched() or not is_main_process() or _state["mode"] != "cli" or _state["released"]:
        return
    _state["released"] = True
    broadcast({"run_path": _state["run_path"], "done": done})


def training_started() -> None:
    """Called by the engine when a training call starts: a worker's writes are errors again until it ends."""
    _state["trained"] = False


def training_finished() -> None:
    """Called by the engine after a training call: a worker's next file write ends its command."""
    _state["trained"] = True


def is_worker_command() -> bool:
    """Whether this process is a worker (rank > 0) of a launched CLI command."""
    return _state["mode"] == "cli" and is_launched() and not is_main_process()


class WorkerWriteError(RuntimeError):
    """A worker rank tried to write a file: only rank 0 writes."""


_ALLOWED_ROOTS: list[str] = []
_WRITE_EVENTS = {
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod", "os.truncate",
    "os.symlink", "os.link", "shutil.copyfile", "shutil.move", "os.utime",
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def guard_worker_writes(on_write: Callable[[str, str], None] | None = None) -> None:
    """Install an audit hook that stops this (worker) process from writing files.

    Writes to ``/dev`` and library caches (``~/.cache``, ``$HF_HOME``, triton and inductor caches, and
    multiprocessing's ``pymp-*`` directories in the temporary directory) are not tunesec's and pass; anything
    else, other paths in the temporary directory too, is a write. Before the worker's training finished it raises
    :class:`WorkerWriteError` (a bug: the worker would write what rank 0 writes); after it, the worker's command
    is over and the process exits 0. ``on_write`` replaces that policy (tests record the attempts).
    """
    if not _ALLOWED_ROOTS:
        tmp = tempfile.gettempdir()
        roots = ["/dev", "/proc", "/sys", str(Path.home() / ".cache")]
        roots += [os.path.join(tmp, p) for p in ("torchinductor_", "triton", "torchelastic_", "pymp-")]
        caches = ("HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
        roots += [os.environ[v] for v in caches if os.environ.get(v)]
        _ALLOWED_ROOTS.extend(os.path.realpath(r) for r in roots)

    tmp_root = os.path.realpath(tempfile.gettempdir())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
            )
            if not writes or not isinstance(path, (str, bytes, os.PathLike)):
                return
        elif event in _WRITE_EVENTS:
            path = args[0] if args else None
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            if event == "os.mkdir" and os.path.isdir(path):  # makedirs(exist_ok=True) of a directory rank 0 made
                return
        else:
            return
        target = os.path.realpath(os.fsdecode(path))
        if any(target == r or target.startswith(r if r.startswith(tmp_root) else r + os.sep)
               for r in _ALLOWED_ROOTS):  # fmt: skip
            return
        if on_write is not None:
            on_write(event, target)
            return
        if _state["trained"]:
            if os.environ.get("TUNESEC_DEBUG_WORKERS") == "1":
                print(f"rank {rank()}: training done; ends before {event} {target} (rank 0 writes)", file=sys.stderr)
            _quiet_exit()
        raise WorkerWriteError(f"rank {rank()}: {event} {target}: only rank 0 writes files (a tunesec bug)")

    sys.addaudithook(hook)


def _quiet_exit() -> None:
    """End a worker's command: leave the process group and exit 0."""
    import contextlib

    with contextlib.suppress(Exception):  # leaving anyway
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- --processes N ------------------------------------------------------------------------------------------


def available_slots() -> tuple[int, str]:
    """How many training processes this machine can hold: CUDA devices, else CPU cores, and which."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA devices"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores, "CPU cores"


def check_processes(n: int) -> None:
    """Refuse a process count the machine cannot hold, or a nested launch."""
    if n < 1:
        raise UsageError(f"--processes {n}: expected 1 or more")
    if is_launched():
        raise UsageError(f"--processes {n}: this command already runs under a launcher ({world_size()} processes)")
    have, what = available_slots()
    if n > have:
        raise UsageError(f"--processes {n}: this machine has {have} {what}; use at most {have}")


def launch_argv(argv: Sequence[str]) -> list[str]:
    """The command line one rank runs: ``python -m tunesec argv`` (the same for ``accelerate launch -m tunesec``)."""
    return [sys.executable, "-m", "tunesec", *argv]


def strip_processes(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--processes N`` / ``--processes=N`` option."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--processes":
            skip = True
            continue
        if a.startswith("--processes="):
            continue
        out.append(a)
    return out


def relaunch(n: int, argv: Sequence[str]) -> int:
    """Run ``tunesec argv`` (less ``--processes``) on ``n`` processes of this machine and wait for them.

    Each process gets the environment torch's launcher (``torchrun --standalone``, what ``accelerate launch``
    starts) would give it: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` (a free port). When a rank fails the others are stopped. Returns rank 0's exit code when it
    failed (2 for bad input, whose one line it printed), else the first failing rank's, else 0.
    """
    import socket
    import subprocess
    import time

    check_processes(n)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ)
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
                 "LOCAL_WORLD_SIZE": str(n), PROCESSES_ENV: "1"})  # fmt: skip
    if _on_cpu():  # share the cores out instead of oversubscribing them (what accelerate launch does)
        base.setdefault("OMP_NUM_THREADS", str(max(1, available_slots()[0] // n)))
    cmd = launch_argv(strip_processes(argv))
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]
    first_failed: int | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if first_failed is None:
                first_failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
                if first_failed is not None:  # one rank failed: the others would wait for it forever
                    for p in procs:
                        if p.poll() is None:
                            p.terminate()
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        return 130
    if first_failed is None:
        return 0
    code = procs[0].returncode if procs[0].returncode not in (None, 0) and procs[0].returncode > 0 else None
    failed = procs[first_failed].returncode
    return int(code if code is not None else (failed if failed and failed > 0 else 1))


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()
