"""``run_matrix()``: plan, compute the defended models then the cells (locally or as Ray tasks), write the outputs.

The matrix run directory holds ``run.json`` (the config), ``cells.jsonl`` (an index line per cell as it lands:
where its cache directory is), and the outputs of :mod:`tunesec.matrix.report`, rewritten after every cell so a
long matrix can be read while it runs. The run is marked finished only when every cell is done; a matrix with
failed cells stays open, and ``--resume`` retries just those (finished cells are cache hits).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.matrix.cells import (
    Plan,
    cell_dir,
    compute_attack,
    compute_cell,
    compute_defended,
    make_plan,
)
from tunesec.matrix.config import MatrixConfig
from tunesec.matrix.report import write_outputs

INDEX_FILE = "cells.jsonl"
# passed to Ray workers, so that they find the same data, caches and offline settings as this process
_ENV_VARS = ("TUNESEC_HOME", "TUNESEC_DATA", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "PYTHONPATH")


def default_cache() -> Path:
    """Where cells are cached across matrices: ``$TUNESEC_HOME/matrix``."""
    from tunesec.paths import tunesec_home

    return tunesec_home() / "matrix"


def check_executor(executor: str) -> None:
    """A usage error, before any cell runs, for an unknown executor or Ray without the ``ray`` extra."""
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor {executor!r}: expected local or ray")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--executor ray: Ray is not installed; pip install 'tunesec[ray]'") from None


def run_matrix(
    config: MatrixConfig | dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    cache: str | Path | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a defenses x attacks matrix and return ``matrix.json``'s content.

    Args:
        config: The matrix (a :class:`MatrixConfig` or its fields); with ``resume``, taken from the run.
        out: New or empty run directory (default ``runs/<stamp>-matrix-<model>``).
        resume: Continue this matrix run: cached cells are read back, the rest computed.
        cache: Cell cache shared between matrices (default ``$TUNESEC_HOME/matrix``); a resumed matrix uses the
            cache it was started with unless this is given.
        executor: ``local`` (cells one after another in this process) or ``ray`` (cells as Ray tasks).
        ray_address: Ray cluster to join (default: a local one, or ``$RAY_ADDRESS``).
        progress: Show a progress bar.
    """
    from tunesec.config import validate
    from tunesec.store.run import RunDir

    check_executor(executor)
    if resume is not None:
        if config is not None or out is not None:
            raise UsageError("--resume continues a matrix with its own config: give no other matrix options or --out")
        run = RunDir.resume(Path(resume), kind="matrix")
        config = run.meta["spec"]["config"]
    if config is None:
        raise UsageError("a matrix needs a config: --model, --defenses and --attacks (or --config FILE)")
    cfg = config if isinstance(config, MatrixConfig) else validate(MatrixConfig, dict(config), source="matrix config")
    plan = make_plan(cfg)  # every name, config and pair checked before anything is written
    if cache is None and resume is not None and run.meta["spec"].get("cache"):
        cache = run.meta["spec"]["cache"]  # a resumed matrix keeps the cache it was started with
    cache_dir = Path(cache).resolve() if cache is not None else default_cache()
    if resume is None:
        spec = {"config": cfg.model_dump(mode="json"), "cache": str(cache_dir)}
        run = RunDir.create("matrix", f"matrix-{Path(cfg.model).name}", spec, out=Path(out) if out else None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    run_ = _MatrixRun(run.path, cfg, plan, cache_dir)
    if executor == "ray":
        _run_ray(run_, ray_address, progress)
    else:
        _run_local(run_, progress)
    summary = run_.write()
    summary["run_dir"] = str(run.path)
    if not run_.failed:
        run.finish(
            metrics={"cells": len(run_.cells), "verdicts": {c["defense"]: c["verdict"] for c in summary["cards"]}}
        )
    return summary


class _MatrixRun:
    """The state of one matrix run: finished defended models and cells, failures, the index file."""

    def __init__(self, path: Path, cfg: MatrixConfig, plan: Plan, cache: Path) -> None:
        self.path, self.cfg, self.plan, self.cache = path, cfg, plan, cache
        self.cfg_data = cfg.model_dump(mode="json")
        self.defended: dict[str, dict[str, Any]] = {}
        self.cells: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self._indexed = self._read_index()

    def _read_index(self) -> set[str]:
        f = self.path / INDEX_FILE
        if not f.is_file():
            return set()
        keys = set()
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill
        return keys

    def landed(self, result: dict[str, Any]) -> None:
        """Record a finished cell: in memory, in the index (once) and in the outputs."""
        self.cells.append(result)
        if result["key"] not in self._indexed:
            cell = next(c for c in self.plan.cells if c.key == result["key"])
            line = {"key": cell.key, "label": cell.label, "dir": str(cell_dir(self.cache, cell))}
            with (self.path / INDEX_FILE).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
            self._indexed.add(cell.key)
        self.write()

    def fail(self, what: dict[str, Any], err: BaseException) -> None:
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        self.failed.append({**{k: what.get(k) for k in ("defense", "stage", "attack", "seed")}, "error": first[:300]})

    def write(self) -> dict[str, Any]:
        return write_outputs(self.path, self.cfg, self.defended, self.cells, self.failed, len(self.plan.cells))


def _retrying(fn: Callable[[], dict[str, Any]], retries: int) -> dict[str, Any]:
    """``fn()``, tried again up to ``retries`` times; bad input (a UsageError) is not retried."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except UsageError:
            raise
        except Exception:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def _run_local(m: _MatrixRun, progress: bool) -> None:
    from tunesec.progress import make_progress

    attacked: dict[str, dict[str, Any]] = {}
    attack_errors: dict[str, BaseException] = {}
    runs = {a.key: a for a in m.plan.attacks}
    with make_progress(progress) as bar:
        task = bar.add_task("matrix", total=len(m.plan.defended) + len(m.plan.cells))
        for d in m.plan.defended:
            bar.update(task, info=f"defend {d.defense}")
            try:
                job = partial(compute_defended, asdict(d), m.cfg_data, str(m.cache))
                m.defended[d.key] = _retrying(job, m.cfg.retries)
            except Exception as err:  # reported with its cells, never dropped; Ctrl-C still stops the matrix
                m.fail({"defense": d.defense, "stage": d.stage, "attack": "(defend)", "seed": ""}, err)
            bar.advance(task)
        for c in m.plan.cells:
            bar.update(task, info=c.label)
            try:
                if c.defended_key not in m.defended:
                    raise RuntimeError("its defended model failed")
                run = runs[c.attack_key]
                if run.key in attack_errors:
                    raise attack_errors[run.key]
                if run.key not in attacked:
                    job = partial(compute_attack, asdict(run), m.defended[run.defended_key], str(m.cache))
                    try:
                        attacked[run.key] = _retrying(job, m.cfg.retries)
                    except Exception as err:
                        attack_errors[run.key] = err
                        raise
                args = (asdict(c), m.defended[c.defended_key], attacked[run.key], m.cfg_data, str(m.cache))
                m.landed(_retrying(partial(compute_cell, *args), m.cfg.retries))
            except Exception as err:
                m.fail(asdict(c), err)
            bar.advance(task)


def _run_ray(m: _MatrixRun, address: str | None, progress: bool) -> None:
    """Defended models, attack runs, then cells as Ray tasks, each waiting on the tasks whose results it takes."""
    import ray

    from tunesec.progress import make_progress

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _ENV_VARS if k in os.environ}
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
    retry = {"max_retries": m.cfg.retries, "retry_exceptions": True}
    defend_task = ray.remote(**retry)(compute_defended)  # type: ignore[call-overload]
    attack_task = ray.remote(**retry)(compute_attack)  # type: ignore[call-overload]
    cell_task = ray.remote(**retry)(compute_cell)  # type: ignore[call-overload]
    defended: dict[str, Any] = {}
    given: Any = None  # the defenses that keep the given model share its evaluations: one task after another
    for d in m.plan.defended:
        after = [given] if d.stage != "alignment" and given is not None else []
        defended[d.key] = defend_task.remote(asdict(d), m.cfg_data, str(m.cache), *after)
        if d.stage != "alignment":
            given = defended[d.key]
    attacked = {a.key: attack_task.remote(asdict(a), defended[a.defended_key], str(m.cache)) for a in m.plan.attacks}
    cells = {
        cell_task.remote(asdict(c), defended[c.defended_key], attacked[c.attack_key], m.cfg_data, str(m.cache)): c
        for c in m.plan.cells
    }
    with make_progress(progress) as bar:
        task = bar.add_task("matrix (ray)", total=len(m.plan.defended) + len(m.plan.cells))
        for d in m.plan.defended:
            try:
                m.defended[d.key] = ray.get(defended[d.key])
            except Exception as err:
                m.fail({"defense": d.defense, "stage": d.stage, "attack": "(defend)", "seed": ""}, _cause(err))
            bar.advance(task)
        pending = list(cells)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            c = cells[ready[0]]
            try:
                m.landed(ray.get(ready[0]))
            except Exception as err:
                m.fail(asdict(c), _cause(err))
            bar.update(task, advance=1, info=c.label)
    order = [c.key for c in m.plan.cells]
    m.cells.sort(key=lambda r: order.index(r["key"]))


def _cause(err: BaseException) -> BaseException:
    """The task's own exception inside Ray's wrappers (a cell whose attack failed carries the attack's error)."""
    while isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause  # type: ignore[attr-defined]
    return err
