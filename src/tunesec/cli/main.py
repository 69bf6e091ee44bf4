"""The ``tunesec`` command line. Thin: parse, call the Python API, print.

Heavy modules (torch, transformers) are imported inside commands, so ``tunesec --help`` stays fast.
Bad input raises :class:`tunesec.errors.UsageError`: one line on stderr, exit code 2, no traceback unless
``--debug`` is given.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import click
import typer
from rich.markup import escape

from tunesec import __version__
from tunesec.cli import common, models_cmd
from tunesec.errors import UsageError

app = typer.Typer(
    name="tunesec",
    help="A security lab for the fine-tuning lifecycle of LLMs: audit, attack, defend, evaluate, certify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tunesec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """tunesec: fine-tuning security lab."""


app.add_typer(models_cmd.models_app, name="models")
app.command("generate")(models_cmd.generate)
app.command("list")(common.list_components)


def _register_optional(module: str) -> None:
    """Add the commands of a CLI module (each exposes ``register(app)``); importing it must stay cheap."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return
    importlib.import_module(module).register(app)


for _module in (
    "tunesec.cli.evaluate",
    "tunesec.cli.attack",
    "tunesec.cli.defend_cmd",
    "tunesec.cli.finetune_cmd",
    "tunesec.cli.repair_cmd",
    "tunesec.cli.certify",
    "tunesec.cli.judge_cmd",
    "tunesec.cli.runs_cmd",
    "tunesec.cli.serve_cmd",
    "tunesec.cli.audit_cmd",
    "tunesec.cli.scan_cmd",
    "tunesec.cli.matrix_cmd",
):
    _register_optional(_module)


def _parser_exceptions() -> tuple[tuple[type[BaseException], ...], ...]:
    """Exit, no-arguments-help, parser-error and abort classes of click and of typer's vendored click.

    typer >= 0.16 raises its own copy of click's exceptions (``typer._click``), which ``click.ClickException``
    does not catch; both are listed so that every parser error takes the one-line path.
    """
    exits: list[type[BaseException]] = [click.exceptions.Exit, typer.Exit]
    no_args: list[type[BaseException]] = []
    errors: list[type[BaseException]] = [click.ClickException]
    aborts: list[type[BaseException]] = [click.exceptions.Abort, typer.Abort]
    if hasattr(click.exceptions, "NoArgsIsHelpError"):
        no_args.append(click.exceptions.NoArgsIsHelpError)
    vendored: Any = None
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    if vendored is not None:
        errors.append(vendored.ClickException)
        no_args.extend([c for c in (getattr(vendored, "NoArgsIsHelpError", None),) if c is not None])
        exits.extend([c for c in (getattr(vendored, "Exit", None),) if c is not None])
        aborts.extend([c for c in (getattr(vendored, "Abort", None),) if c is not None])
    return tuple(exits), tuple(no_args), tuple(errors), tuple(aborts)


_EXIT, _NO_ARGS, _CLICK_ERRORS, _ABORT = _parser_exceptions()


def _quiet_loaded_libraries() -> None:
    """The same silence for libraries already imported in this process (the environment is read at import)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" and "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
            hf_logging.disable_progress_bar()
        if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
            hf_logging.set_verbosity_error()


def _message(exc: BaseException) -> str:
    fmt = getattr(exc, "format_message", None)
    return str(fmt() if callable(fmt) else exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tunesec`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("TUNESEC_DEBUG") == "1"
    if not debug:
        # PEFT asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 deprecates: a
        # warning at each adapter load that concerns neither the user's model nor their command
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # PEFT's save_pretrained looks the base model's config up on the hub to see whether the vocabulary changed;
        # a local or aliased base is not on the hub (and the machine may be offline): two warnings per saved adapter
        # about a look-up tunesec does not need (it records the base itself).
        warnings.filterwarnings("ignore", message="Unable to fetch remote file", category=UserWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        # transformers' and the hub's own progress bars ("Loading weights", "Converting and de-quantizing GGUF
        # tensors") and info logs would interleave with tunesec's progress; read at their import, which comes later.
        # A user's own setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        _quiet_loaded_libraries()
    from tunesec.training import distributed

    distributed.set_argv(args)
    try:
        if distributed.is_launched():  # one of several processes (accelerate launch, torchrun, --processes N)
            distributed.start_command()
            if not distributed.is_main_process():
                common.console.quiet = True  # rank 0 reports; the workers only train
        result = app(args=args, prog_name="tunesec", standalone_mode=False)
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _NO_ARGS as exc:
        # A bare command (``tunesec``, ``tunesec models``) asks for its help: show it, no error.
        typer.echo(_message(exc))
        return 0
    except _CLICK_ERRORS as exc:
        if debug:
            traceback.print_exc()
        ctx: Any = getattr(exc, "ctx", None)
        where = f"tunesec {ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
        message = " ".join(_message(exc).split())
        common.err_console.print(f"[bold red]error:[/] {escape(where + message)}", highlight=False, soft_wrap=True)
        return 2
    except _ABORT:
        common.err_console.print("interrupted")
        return 130
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        common.err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        common.err_console.print("interrupted")
        return 130
    except Exception as exc:  # a bug, not bad input: one line too, the traceback behind --debug
        if debug:
            raise
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        common.err_console.print(
            f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(' '.join(str(exc).split()))}{at} "
            "(a tunesec bug: rerun with --debug for the traceback and report it)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    finally:
        distributed.release_workers(done=True)  # rank 0 ended without training: the workers have nothing to do
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
