"""``tunesec matrix``: every defense against every attack (and seed), worst case within a utility bound.

Writes ``matrix.csv``, ``matrix.json``, ``heatmap.png`` and ``report.html`` (a robustness card per defense) into
its run directory; cells are cached by content hash (``--cache``) and a killed matrix resumes with ``--resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",")]


def matrix_command(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Undefended model (defense `none`), e.g. smollm2-135m-aligned.")
    ] = None,
    defenses: Annotated[
        str | None, typer.Option(help="Comma-separated defenses; `none` is the model as given (default: none).")
    ] = None,
    attacks: Annotated[str | None, typer.Option(help="Comma-separated attacks, fixed and adaptive.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Attack seeds per (defense, attack) pair.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML matrix config (docs/MATRIX.md); options override it.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override KEY=VALUE, e.g. attack_config.harmful-sft.n=50 (repeatable)."),
    ] = None,
    executor: Annotated[str, typer.Option(help="local (cells in turn) or ray (cells as Ray tasks).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: a local one).")] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Cell cache shared between matrices (default: $TUNESEC_HOME/matrix).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an unfinished matrix run (retries failed cells).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Run DEFENSES x ATTACKS x SEEDS on MODEL; prints each defense's verdict and the report's path."""
    from tunesec.cli.attack import _data_dir
    from tunesec.cli.common import console
    from tunesec.config import apply_overrides, read_yaml, validate
    from tunesec.errors import UsageError
    from tunesec.matrix import MatrixConfig, run_matrix
    from tunesec.matrix.runner import check_executor

    check_executor(executor)
    given = {"model": model, "defenses": _names(defenses), "attacks": _names(attacks), "seeds": seeds}
    with _data_dir(data_dir):
        if resume is not None:
            if config is not None or set_ or any(v is not None for v in given.values()):
                raise UsageError("--resume continues a matrix with its own config: give no other matrix options")
            summary = run_matrix(resume=resume, cache=cache, executor=executor, ray_address=ray_address)
        else:
            data = read_yaml(config) if config is not None else {}
            data.update({k: v for k, v in given.items() if v is not None})
            data = apply_overrides(data, set_)
            source = str(config) if config is not None else "matrix options"
            cfg = validate(MatrixConfig, data, source=source, path=None if (set_ or not config) else config)
            summary = run_matrix(cfg, out=out, cache=cache, executor=executor, ray_address=ray_address)
    run_dir = Path(summary["run_dir"])
    for card in summary["cards"]:
        console.print(f"{card['defense']}: {card['verdict']}")
    if summary["failed_cells"]:
        console.print(f"[red]{len(summary['failed_cells'])} cell(s) failed[/]: see report.html; --resume retries them")
    typer.echo(str(run_dir / "report.html"))
    if summary["failed_cells"]:
        raise typer.Exit(1)


def register(parent: typer.Typer) -> None:
    """Add ``matrix`` to the top-level ``tunesec`` app."""
    parent.command("matrix")(matrix_command)
