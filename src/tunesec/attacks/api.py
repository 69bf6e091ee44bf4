"""``tunesec.attack()``: the Python form of ``tunesec attack`` (a run directory with the attacked model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef


def attack(
    name: str,
    model: str,
    *,
    data: str | list[Example] | None = None,
    config: Config | dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
) -> ModelRef:
    """Run attack ``name`` on ``model`` into a run directory and return the attacked model's ref.

    The run directory (``out``, default ``runs/<stamp>-<name>-...``) gets ``run.json`` (the same spec as the
    command's), the attacked model in ``model/`` and ``model_ref.json``; ``resume`` continues an unfinished run
    from its last checkpoint. Bad input found once the data is read discards the new run.

    Example:
        >>> ref = tunesec.attack("harmful-sft", "smollm2-135m-aligned", config={"n": 50})  # doctest: +SKIP
    """
    from tunesec.attacks import get_attack
    from tunesec.store.run import RunDir

    atk = get_attack(name, config)
    label = data if isinstance(data, str) or data is None else f"{len(data)} examples"
    spec = {"attack": name, "model": model, "data": label, "config": atk.config.model_dump(mode="json")}
    if resume is not None:
        run = RunDir.resume(Path(resume), kind="attack", spec=spec)
    else:
        run = RunDir.create("attack", f"{name}-{Path(model).name}", spec, out=Path(out) if out is not None else None)
    ckpts = run.path / "checkpoints"
    has_ckpt = ckpts.is_dir() and any((c / "trainer_state.json").is_file() for c in ckpts.glob("checkpoint-*"))
    try:
        ref = atk.run(model, run.path, data=data, resume=has_ckpt, progress=progress)
    except UsageError:
        run.discard()
        raise
    run.finish(model=ref.model_dump(mode="json"))
    return ref
