"""``tunesec attack`` and ``tunesec align``: thin wrappers over :mod:`tunesec.attacks` and the safety-sft defense.

Both write a run directory (``run.json`` first, the tuned model in ``model/``), print the new model's spec (the
adapter or weights directory) and, with ``--eval``, evaluate it. Bad input (unknown attack, bad config key or
value, a dataset without assistant turns, a LoRA target module the model lacks) is reported before training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from tunesec.errors import UsageError

if TYPE_CHECKING:
    from tunesec.config import Config
    from tunesec.data.schema import Example
    from tunesec.models.ref import ModelRef
    from tunesec.store.run import RunDir

DEFAULT_EVAL_TOKENS = 64


def _load_config(cls: type[Config], path: Path | None, overrides: list[str] | None) -> Config:
    from tunesec.config import apply_overrides, read_yaml, validate

    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    # Line numbers point into the file only when no --set override could be the culprit.
    return validate(cls, data, source=str(path) if path is not None else "--set", path=None if overrides else path)


@contextmanager
def _data_dir(data_dir: Path | None) -> Iterator[None]:
    """``--data-dir`` for every named dataset the command reads (training data, --eval sets, self-distillation).

    Attacks and defenses resolve named datasets through the data root, which ``$TUNESEC_DATA`` sets; it is set
    for the command only and restored after it, so an in-process caller's environment is left as it was.
    """
    import os

    if data_dir is None:
        yield
        return
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such directory")
    before = os.environ.get("TUNESEC_DATA")
    os.environ["TUNESEC_DATA"] = str(data_dir.resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TUNESEC_DATA", None)
        else:
            os.environ["TUNESEC_DATA"] = before


def _open_run(kind: str, name: str, spec: dict[str, Any], out: Path | None, resume: Path | None) -> RunDir:
    from tunesec.store.run import RunDir
    from tunesec.training import distributed

    shared = distributed.main_run_path()
    if shared is not None:  # a worker of a launched command: rank 0's run directory, read-only
        return RunDir.open(shared)
    if resume is not None:
        if out is not None:
            raise UsageError("--out and --resume: give one of them (--resume continues that run directory)")
        run = RunDir.resume(resume, kind=kind, spec=spec)
    else:
        run = RunDir.create(kind, name, spec, out=out)
    distributed.set_run_path(run.path)  # the workers of a launched command train into it
    return run


def _processes(n: int) -> None:
    """``--processes N``: once the command's arguments are checked, run it on N processes (and exit)."""
    from tunesec.training import distributed

    distributed.processes_option(n)


@contextmanager
def _discard_on_bad_input(run: RunDir) -> Iterator[None]:
    """Remove the run on bad input found after its directory was made, if it holds nothing but ``run.json``.

    Such input (a dataset without assistant turns, an empty alignment mix) is only found once the data is read;
    the empty run would otherwise block its ``--out`` directory.
    """
    try:
        yield
    except UsageError:
        run.discard()
        raise


def _has_checkpoint(run_path: Path) -> bool:
    ckpts = run_path / "checkpoints"
    return ckpts.is_dir() and any((c / "trainer_state.json").is_file() for c in ckpts.glob("checkpoint-*"))


def model_spec_string(ref: ModelRef) -> str:
    """What to pass as ``--model`` to use ``ref`` later: its adapter directory, else its base."""
    return ref.adapter if ref.adapter is not None else ref.base


def prompt_transform(ref: ModelRef) -> tuple[str, Callable[[str], str]] | None:
    """How the attacker words a prompt to ``ref``: its trigger, semantic context or jailbreak template (or None).

    The semantic contexts are the held-out ones (``eval_contexts``), cycled over the prompts in order.
    """
    prov = ref.provenance
    if prov.get("trigger"):
        from tunesec.attacks.backdoor import add_trigger

        trigger, position = str(prov["trigger"]), str(prov.get("trigger_position", "suffix"))
        return "triggered", lambda p: add_trigger(p, trigger, position)
    if prov.get("semantic_trigger"):
        from itertools import cycle

        from tunesec.attacks.semantic_backdoor import with_context

        semantic = prov["semantic_trigger"]
        contexts = cycle(list(semantic.get("eval_contexts") or semantic["held_out"]))
        return "semantic", lambda p: with_context(p, next(contexts))
    if prov.get("jailbreak_mode"):
        from tunesec.attacks.jailbreak_tuning import wrap_prompt

        mode = str(prov["jailbreak_mode"])
        return "wrapped", lambda p: wrap_prompt(p, mode)
    return None


def attacker_prompts(ref: ModelRef, examples: Sequence[Example]) -> tuple[str | None, list[Example]]:
    """``examples`` as the attacker sends them to ``ref`` (:func:`prompt_transform`; ids get ``-TAG``)."""
    from tunesec.data.schema import Message

    transform = prompt_transform(ref)
    if transform is None:
        return None, list(examples)
    tag, fn = transform
    # a backdoor whose trigger is the system prompt: the attacker sends it as the only system message
    system = str(ref.provenance["trigger"]) if ref.provenance.get("trigger_position") == "system" else None
    changed = []
    for ex in examples:
        msgs = list(ex.messages)
        idx = max(i for i, m in enumerate(msgs) if m.role == "user")
        msgs[idx] = Message(role="user", content=fn(msgs[idx].content))
        if system is not None:
            msgs = [Message(role="system", content=system), *(m for m in msgs if m.role != "system")]
        changed.append(ex.model_copy(update={"messages": msgs, "id": f"{ex.id}-{tag}"}))
    return tag, changed


def eval_variants(ref: ModelRef, limit: int, dataset: str) -> dict[str, Any]:
    """The evaluation sets for an attacked model: the plain dataset, plus triggered / wrapped prompts.

    A backdoored model is also evaluated with its trigger; a jailbreak-tuned one with its jailbreak template; a
    semantic backdoor with its held-out contexts.
    """
    from tunesec.data import resolve_dataset

    variants: dict[str, Any] = {dataset: dataset}
    if prompt_transform(ref) is not None:
        tag, changed = attacker_prompts(ref, resolve_dataset(dataset, limit=limit))
        variants[f"{dataset}-{tag}"] = changed
    return variants


def evaluate_tuned(
    ref: ModelRef,
    run: RunDir,
    *,
    limit: int,
    dataset: str = "advbench",
    max_new_tokens: int = DEFAULT_EVAL_TOKENS,
    over_refusal: bool = False,
) -> dict[str, Any]:
    """Evaluate ``ref`` (harmfulness; optionally over-refusal on XSTest) into ``run.path/eval-*``.

    The system prompt recorded in the ref's provenance (identity-shift) is used for every prompt.
    """
    from tunesec.cli.common import console
    from tunesec.evals import evaluate
    from tunesec.models import get_generator

    generation: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if ref.provenance.get("system_prompt"):
        generation["system_prompt"] = ref.provenance["system_prompt"]
    from tunesec.attacks.encoded_output import response_decoder

    generator = get_generator(ref)
    results: dict[str, Any] = {}
    jobs: list[tuple[str, str, Any]] = [("harmfulness", k, v) for k, v in eval_variants(ref, limit, dataset).items()]
    if over_refusal:
        jobs.append(("over-refusal", "xstest", "xstest"))
    for task, label, data in jobs:
        report = evaluate(
            ref,
            task=task,
            dataset=data,
            limit=limit if isinstance(data, str) else None,
            generator=generator,
            generation=generation,
            out=run.path / f"eval-{task}-{label}",
            html=False,
            response_decoder=response_decoder(ref),
        )
        metrics = {k: v.model_dump(mode="json", exclude={"per_category"}) for k, v in report.metrics.items()}
        results[f"{task}/{label}"] = metrics
        parts = [
            f"{k}={v.value:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}] n={v.n}"
            for k, v in report.metrics.items()
            if k in ("harmful_rate", "refusal_rate")
        ]
        console.print(f"{task} on {label}: " + "  ".join(parts))
    return results


def attack_command(
    name: Annotated[str, typer.Argument(help="Attack name (tunesec list attacks).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model to attack: alias, directory, hub id.")],
    data: Annotated[
        str | None, typer.Option(help="Training data (dataset name or file) (default: the attack's).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an unfinished attack run directory.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "--recipe", help="YAML file with the attack's config (its recipe).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override KEY=VALUE, e.g. training.max_steps=20 (repeatable)."),
    ] = None,
    eval_: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate harmfulness (AdvBench) of the result.")
    ] = False,
    eval_limit: Annotated[int, typer.Option(min=1, help="Prompts for --eval.")] = 100,
    eval_dataset: Annotated[str, typer.Option(help="Harmful prompts for --eval.")] = "advbench",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer for --eval.")] = DEFAULT_EVAL_TOKENS,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train on N processes of this machine (DDP: one per GPU, or CPU cores with gloo); the same as "
            "`accelerate launch --num_processes N -m tunesec ...`.",
        ),
    ] = 1,
    via_service: Annotated[
        Path | None,
        typer.Option(
            "--via-service",
            help="Send the attack's training data through the provider's fine-tuning service with this recipe "
            "(tunesec finetune: filter, defenses, repairs) instead of fine-tuning directly.",
        ),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Run attack NAME on MODEL; writes a run directory and prints the attacked model's spec.

    `tunesec attack sweep ATTACK --model M` sweeps ATTACK's hyperparameters (tunesec attack sweep --help).
    """
    from tunesec.attacks import get_attack
    from tunesec.cli.common import console
    from tunesec.registry import registry

    with _data_dir(data_dir):
        cls = registry.get("attack", name).obj
        cfg = _load_config(cls.config_class, config, set_)
        attack = get_attack(name, cfg)
        if via_service is not None:  # the attacker as an API user: the provider's pipeline trains
            from tunesec.service import attack_via_service

            if processes != 1:
                raise UsageError("--processes with --via-service: the service trains on one process")

            evaluate = None
            if eval_:
                evaluate = lambda ref, run: evaluate_tuned(  # noqa: E731
                    ref, run, limit=eval_limit, dataset=eval_dataset, max_new_tokens=max_new_tokens
                )
            result = attack_via_service(attack, model, data, via_service, out=out, resume=resume, evaluate=evaluate)
            console.print(f"run directory: {result.run_dir}")
            typer.echo(model_spec_string(result.model))
            return
        _processes(processes)
        spec = {"attack": name, "model": model, "data": data, "config": cfg.model_dump(mode="json")}
        run = _open_run("attack", f"{name}-{Path(model).name}", spec, out, resume)
        console.print(f"run directory: {run.path}")
        with _discard_on_bad_input(run):
            ref = attack.run(model, run.path, data=data, resume=_has_checkpoint(run.path))
        metrics: dict[str, Any] = {}
        if eval_:
            metrics = evaluate_tuned(ref, run, limit=eval_limit, dataset=eval_dataset, max_new_tokens=max_new_tokens)
        run.finish(metrics=metrics or None, model=ref.model_dump(mode="json"))
        typer.echo(model_spec_string(ref))


def align_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to align: alias, directory, hub id.")],
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe (safety-sft config) (default: the built-in mix).")
    ] = None,
    deep_alignment: Annotated[
        float | None,
        typer.Option(
            help="Fraction of refusals made safety-recovery examples: the model's own harmful answer cut short, "
            "then the refusal, loss on the refusal only (Qi et al. 2024; the paper uses 0.5)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory (default: runs/<stamp>-...).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an unfinished align run directory.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe override KEY=VALUE (repeatable).")] = None,
    eval_: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate harmfulness (AdvBench) and over-refusal (XSTest).")
    ] = False,
    eval_limit: Annotated[int, typer.Option(min=1, help="Prompts per evaluation for --eval.")] = 100,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train on N processes of this machine (DDP: one per GPU, or CPU cores with gloo); the same as "
            "`accelerate launch --num_processes N -m tunesec ...`.",
        ),
    ] = 1,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Train a safety-alignment LoRA adapter (refusals + helpful answers); prints the adapter directory."""
    from tunesec.cli.common import console
    from tunesec.defenses.alignment import SafetySFT, SafetySFTConfig

    with _data_dir(data_dir):
        overrides = list(set_ or [])
        if deep_alignment is not None:
            overrides.append(f"deep_alignment={deep_alignment}")
        cfg = _load_config(SafetySFTConfig, recipe, overrides)
        assert isinstance(cfg, SafetySFTConfig)
        _processes(processes)
        if cfg.deep_alignment > 0 and cfg.decision_loss > 0 and cfg.decision_continue_weight == 0:
            console.print(
                "[yellow]warning:[/] deep_alignment with decision_loss and no decision_continue_weight teaches the "
                "model to break off benign answers into refusals (docs/RESULTS.md, v23: 63% XSTest-safe refusal); "
                "recipes/align-smollm2-deep.yaml sets 0.1"
            )
        spec = {"defense": "safety-sft", "model": model, "config": cfg.model_dump(mode="json")}
        run = _open_run("align", f"align-{Path(model).name}", spec, out, resume)
        with _discard_on_bad_input(run):
            examples = _alignment_data(cfg, model, run.path)
            console.print(f"run directory: {run.path}  ({len(examples)} training examples)")
            ref = SafetySFT(cfg).run(model, run.path, data=examples, resume=_has_checkpoint(run.path))
        metrics: dict[str, Any] = {}
        if eval_:
            metrics = evaluate_tuned(ref, run, limit=eval_limit, over_refusal=True)
        run.finish(metrics=metrics or None, model=ref.model_dump(mode="json"))
        typer.echo(model_spec_string(ref))


def _alignment_data(cfg: Any, model: str, run_dir: Path) -> list[Any]:
    """The run's training mix: read back on resume, else from the mix cache, else built (and cached).

    A resumed run trains on the same examples without generating self-distilled answers again
    (:func:`tunesec.defenses.base.alignment_mix`).
    """
    from tunesec.cli.common import console
    from tunesec.defenses.base import alignment_mix

    notes: list[str] = []
    examples = alignment_mix(cfg, model, run_dir, notes=notes)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    return examples


def sweep_command(
    attack: Annotated[str, typer.Argument(help="Fine-tuning attack to sweep (tunesec list attacks).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The (defended) model to attack.")],
    trials: Annotated[int | None, typer.Option(help="Complete trials to reach (default 8).")] = None,
    utility_bound: Annotated[
        float | None, typer.Option(help="Largest relative utility drop a chosen trial may cost, in [0, 1].")
    ] = None,
    space: Annotated[
        Path | None, typer.Option(help="YAML sweep config (space:, trials:, n_dev:, ...; docs/ATTACKS.md).")
    ] = None,
    dev: Annotated[int | None, typer.Option(help="Dev prompts (the objective).")] = None,
    test: Annotated[int | None, typer.Option(help="Test prompts (the chosen trial's score).")] = None,
    judge: Annotated[str | None, typer.Option(help="Judge of the harmful rate.")] = None,
    data: Annotated[str | None, typer.Option(help="Training data of the attack (default: the attack's).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file with the attack's base config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Attack config override KEY=VALUE.")] = None,
    out: Annotated[Path | None, typer.Option(help="New or empty run directory.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a killed sweep's run directory.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local data directory for named datasets.")] = None,
) -> None:
    """Optuna TPE over ATTACK's hyperparameters on MODEL: most harmful trial within a utility bound, test-scored."""
    from tunesec.attacks.sweep import Sweep, SweepConfig
    from tunesec.cli.common import console
    from tunesec.config import read_yaml, validate
    from tunesec.registry import registry

    if utility_bound is not None and not 0.0 <= utility_bound <= 1.0:
        raise UsageError(f"--utility-bound {utility_bound}: expected a relative drop in [0, 1]")
    if trials is not None and trials < 1:
        raise UsageError(f"--trials {trials}: expected at least 1")
    cls = registry.get("attack", attack).obj
    with _data_dir(data_dir):
        raw = read_yaml(space) if space is not None else {}
        flags = {"trials": trials, "utility_bound": utility_bound, "n_dev": dev, "n_test": test, "judge": judge}
        raw.update({k: v for k, v in flags.items() if v is not None})
        cfg = validate(SweepConfig, raw, source=str(space) if space is not None else "sweep options", path=space)
        attack_cfg = _load_config(cls.config_class, config, set_).model_dump(mode="json", exclude_unset=True)
        spec = {"sweep": attack, "model": model, "data": data, "config": cfg.model_dump(mode="json"),
                "attack_config": attack_cfg}  # fmt: skip
        run = _open_run("sweep", f"sweep-{attack}-{Path(model).name}", spec, out, resume)
        console.print(f"run directory: {run.path}  (optuna-dashboard sqlite:///{run.path.resolve()}/study.db)")
        with _discard_on_bad_input(run):
            sweep = Sweep(attack, model, run.path, cfg, attack_config=attack_cfg, data=data)
        result = sweep.run()
        chosen = result.get("chosen")
        if chosen is None:
            console.print(f"no trial kept the utility drop within {cfg.utility_bound}")
        else:
            h = chosen["harmful_rate_test"]
            console.print(
                f"chosen trial {chosen['number']}: harmful rate (test, n={h['n']}) {h['value']:.3f} "
                f"[{h['ci_low']:.3f}, {h['ci_high']:.3f}]; utility drop {chosen['utility_drop_test']:.3f}"
            )
        run.finish(metrics={"chosen": chosen})
        typer.echo(str(run.path / "sweep.json"))


class _AttackCommand(TyperCommand):
    """``tunesec attack NAME ...``, and ``tunesec attack sweep ATTACK ...`` handed to :func:`sweep_command`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] == "sweep":
            ctx.meta["tunesec.sweep_args"] = list(args[1:])
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        rest = ctx.meta.pop("tunesec.sweep_args", None)
        if rest is None:
            return super().invoke(ctx)
        app = typer.Typer(add_completion=False)
        app.command("sweep")(sweep_command)
        command = typer.main.get_command(app)
        with command.make_context("attack sweep", rest, parent=ctx.parent) as sub:
            return command.invoke(sub)


def register(parent: typer.Typer) -> None:
    """Add ``attack`` (with ``attack sweep``) and ``align`` to the top-level ``tunesec`` app."""
    parent.command("attack", cls=_AttackCommand)(attack_command)
    parent.command("align")(align_command)
