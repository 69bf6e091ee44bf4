"""The provider's fine-tuning service: ``tunesec finetune`` and :func:`finetune`.

A user uploads chat data; the provider fine-tunes its model ``M`` on it and may act before, during and after
training. The pipeline, one run directory, every stage's provenance in it::

    user data ─► [filter: data-filter (the audit's detectors)] ─► [add: safety-mix, backdoor-align]
              ─► [train: the one engine + fine-tuning-stage hooks (lisa, safety-mix batches, constrained-sft, salora)]
              ─► [repair: post-fine-tuning repairs, in order (tunesec.defenses.post.repair)]
              ─► [certify against M (optional; tunesec certify's runner)]

Run directory: ``run.json`` (the spec: model, the data's sha256, each defense's and repair's full config, the
training config; never a secret) with a ``stages`` list (each stage's provenance and seconds), the kept user rows
(``user_data.kept.jsonl``), the safety examples used (``safety_data.jsonl``), ``train/`` (checkpoints, the trained
model, ``model_ref.json``), ``repair-<i>-<name>/`` (each repair's own run), ``certify/``, and the final
``model_ref.json``. ``secret/`` holds BackdoorAlign's secret prompt (mode 0600), which nothing else records.

Resume (``--resume DIR``): the spec must match; kept rows and the safety data are read back, training continues
from its last checkpoint, finished repairs are kept (an unfinished one is redone), certification continues. A
finished run is never resumed or overwritten. Bad input (unknown names, a defense of another stage, user data
without assistant turns, bad recipe keys) is reported before anything is written.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from tunesec.attacks.base import small_model_training
from tunesec.config import Config
from tunesec.data.schema import Example
from tunesec.defenses.finetune.base import SafetyDataConfig
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.training.config import TrainConfig

KIND = "finetune"
KEPT_FILE = "user_data.kept.jsonl"


def service_training() -> TrainConfig:
    """The service's default training: LoRA r=8 (the aligned adapter continued), lr 5e-4, one epoch, batch 8.

    The git-disl fine-tuning stage trains 20 epochs at lr 1e-5 (bs 5) on 7B models; on a CPU one epoch over 1,000
    rows (125 steps) at the learning rate the harmful-sft attack uses for 100-400M models (5e-4) keeps a run near
    15 minutes for SmolLM2-135M. ``max_seq_len`` 512 leaves room for BackdoorAlign's 150-token secret prompt.
    """
    return small_model_training(learning_rate=5e-4, num_epochs=1.0, max_seq_len=512, save_steps=25)


class ServiceRecipe(Config):
    """The provider's controls and training (``--recipe FILE``, ``--set KEY=VALUE``)."""

    defense: list[str] = Field(default_factory=list, description="Fine-tuning-stage defenses, in order.")
    repair: list[str] = Field(default_factory=list, description="Post-fine-tuning repairs, applied in order.")
    defenses: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Config of each chosen defense by name (partial; defaults fill the rest)."
    )
    repairs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Config of each chosen repair by name (partial)."
    )
    repair_base: str | None = Field(
        None, description="Unaligned base for repairs that need one (default: the model under M's adapter)."
    )
    safety: SafetyDataConfig = Field(default_factory=SafetyDataConfig, description="The provider's safety data.")
    training: TrainConfig = Field(default_factory=service_training, description="Training hyperparameters.")
    certify: bool = Field(False, description="Certify the result against the model the user fine-tuned.")
    policy: str | None = Field(None, description="Certification policy YAML (default: the shipped policy).")
    certify_limit: int | None = Field(None, ge=1, description="At most this many prompts per certification check.")
    seed: int = Field(0, description="Seed of the service's own draws (safety rows).")


@dataclass
class ServicePlan:
    """Everything checked before a run starts: the recipe, the components, the user's rows."""

    model: str
    recipe: ServiceRecipe
    defenses: list[Any]
    repairs: list[tuple[str, Any]]
    examples: list[Example]
    data_source: str
    origin: dict[str, Any] | None = None

    def spec(self) -> dict[str, Any]:
        """The run's spec (run.json): names and full configs, the data's hash; never data or secrets."""
        from tunesec.data import dataset_sha256

        r = self.recipe
        return {
            "model": self.model,
            "data": {"source": self.data_source, "n": len(self.examples), "sha256": dataset_sha256(self.examples)},
            "defenses": {d.name: d.config.model_dump(mode="json") for d in self.defenses},
            "repairs": {n: c.model_dump(mode="json") for n, c in self.repairs},
            "repair_base": r.repair_base,
            "safety": r.safety.model_dump(mode="json"),
            "training": r.training.model_dump(mode="json"),
            "certify": {"policy": r.policy, "limit": r.certify_limit} if r.certify else None,
            "seed": r.seed,
            **({"origin": self.origin} if self.origin else {}),
        }


@dataclass
class ServiceResult:
    """What :func:`finetune` returns: the run directory, the final model, each stage's record."""

    run_dir: Path
    model: ModelRef
    stages: list[dict[str, Any]] = field(default_factory=list)
    certificate: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    return [n.strip() for n in items if n.strip()]


def load_recipe(
    recipe: str | Path | ServiceRecipe | dict[str, Any] | None, overrides: Sequence[str] | None = None
) -> ServiceRecipe:
    """The service recipe from a YAML file, a mapping or an instance, with ``KEY=VALUE`` overrides."""
    from tunesec.config import apply_overrides, read_yaml, validate

    if isinstance(recipe, ServiceRecipe):
        if overrides:
            data = apply_overrides(recipe.model_dump(mode="json"), list(overrides))
            return validate(ServiceRecipe, data, source="--set")
        return recipe
    path = Path(recipe) if isinstance(recipe, (str, Path)) else None
    data = read_yaml(path) if path is not None else dict(recipe) if isinstance(recipe, dict) else {}
    data = apply_overrides(data, list(overrides) if overrides else None)
    source = str(path) if path is not None else ("--set" if overrides else "recipe")
    return validate(ServiceRecipe, data, source=source, path=None if overrides else path)


def plan(
    model: str,
    data: str | Path | Sequence[Example],
    *,
    defenses: str | Sequence[str] | None = None,
    repairs: str | Sequence[str] | None = None,
    recipe: str | Path | ServiceRecipe | dict[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
    certify: bool | None = None,
    policy: str | Path | None = None,
    origin: dict[str, Any] | None = None,
) -> ServicePlan:
    """Check everything a run needs (names, stages, configs, the user's rows) without writing anything.

    ``defenses``/``repairs`` (comma-separated or lists) replace the recipe's lists when given.

    Raises:
        UsageError: unknown or wrong-stage names, bad config keys or values, user data without assistant turns,
            a configured component that is not chosen, a repair that needs a base none is known for.
    """
    from tunesec.attacks.base import load_data, parse_ref, require_assistant_turns
    from tunesec.defenses.base import defense_config, defense_entry

    rec = load_recipe(recipe, overrides)
    updates: dict[str, Any] = {}
    if defenses is not None:
        updates["defense"] = _names(defenses)
    if repairs is not None:
        updates["repair"] = _names(repairs)
    if certify is not None:
        updates["certify"] = certify
    if policy is not None:
        updates["policy"] = str(policy)
    if updates:
        rec = rec.model_copy(update=updates)
    ref = parse_ref(model)
    if ref.is_endpoint:
        raise UsageError(f"--model {model}: an API endpoint has no weights; the service fine-tunes open weights")
    for kind, chosen, configured in (("defense", rec.defense, rec.defenses), ("repair", rec.repair, rec.repairs)):
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"--{kind}: a name is given twice ({', '.join(chosen)})")
        extra = sorted(set(configured) - set(chosen))
        if extra:
            raise UsageError(f"recipe {kind}s.{extra[0]}: configured but not chosen (add it to --{kind} or `{kind}:`)")
    built = []
    for name in rec.defense:
        entry = defense_entry(name, stage="fine-tuning", command="finetune --defense")
        cfg = defense_config(entry.obj, dict(rec.defenses.get(name, {})), source=f"recipe defenses.{name}")
        built.append(entry.obj(cfg))
    if any(d.name == "salora" for d in built) and rec.training.method != "lora":
        raise UsageError("salora: needs training.method lora (it constrains the LoRA update)")
    rep_built: list[tuple[str, Any]] = []
    if rec.repair:
        from tunesec.defenses.post.base import base_of, get_repair, resolve_model

        for name in rec.repair:
            defense_entry(name, stage="post-fine-tuning", command="finetune --repair")
            rep = get_repair(name, dict(rec.repairs.get(name, {})))
            if rep.needs_base() and rec.repair_base is None and base_of(resolve_model(model, role="aligned")) is None:
                raise UsageError(
                    f"repair {name}: needs the unaligned base model; set repair_base in the recipe "
                    f"({model} is plain weights, so its base is not recorded)"
                )
            rep_built.append((name, rep.config))
    if isinstance(data, (str, Path)):
        examples, source = load_data(data, what="user data"), str(data)
    else:
        examples, source = list(data), (f"attack {origin['attack']}" if origin and "attack" in origin else "examples")
    require_assistant_turns(examples, f"user data {source}")
    return ServicePlan(str(model), rec, built, rep_built, examples, source, origin)


def finetune(
    model: str,
    data: str | Path | Sequence[Example],
    *,
    defenses: str | Sequence[str] | None = None,
    repairs: str | Sequence[str] | None = None,
    recipe: str | Path | ServiceRecipe | dict[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    certify: bool | None = None,
    policy: str | Path | None = None,
    progress: bool = True,
    origin: dict[str, Any] | None = None,
    log: Any = None,
    evaluate: Any = None,
) -> ServiceResult:
    """Run the fine-tuning service on ``model`` with the user's ``data`` (see the module docstring).

    The Python form of ``tunesec finetune``.

    Args:
        model: The provider's model ``M`` (alias, model or adapter directory).
        data: The user's chats (a file, a dataset name, or examples), each ending with an assistant turn.
        defenses: Fine-tuning-stage defenses (``"lisa,salora"`` or a list); default: the recipe's.
        repairs: Post-fine-tuning repairs, in order; default: the recipe's.
        recipe: The service recipe (YAML file, mapping or :class:`ServiceRecipe`).
        overrides: ``KEY=VALUE`` overrides of the recipe (``training.max_steps=20``, ``defenses.lisa.rho=2``).
        out: New or empty run directory (default ``runs/<stamp>-finetune-<model>``).
        resume: An unfinished finetune run directory to continue (same arguments).
        certify: Certify the result against ``model`` (overrides the recipe).
        policy: Certification policy (overrides the recipe).
        progress: Show progress bars.
        origin: Where the data came from (an attack run through the service: its name and config), for the spec.
        log: Called with one line per stage (default: nothing).
        evaluate: ``evaluate(final_ref, run) -> metrics`` run before the run is finished (``attack --eval``).

    Example:
        >>> r = tunesec.finetune("smollm2-135m-aligned", "user.jsonl", defenses="lisa")  # doctest: +SKIP
    """
    from tunesec.store.run import RunDir

    p = plan(
        model, data, defenses=defenses, repairs=repairs, recipe=recipe, overrides=overrides, certify=certify,
        policy=policy, origin=origin,
    )  # fmt: skip
    spec = p.spec()
    if resume is not None:
        if out is not None:
            raise UsageError("--out and --resume: give one of them (--resume continues that run directory)")
        run = RunDir.resume(Path(resume), kind=KIND, spec=spec)
    else:
        run = RunDir.create(KIND, f"finetune-{Path(model).name}", spec, out=Path(out) if out is not None else None)
    try:
        return _run(p, run, progress=progress, log=log or (lambda _line: None), evaluate=evaluate)
    except UsageError:
        if resume is None and not (run.path / "train").exists():
            _drop_pre_training_files(run.path)  # bad input found before training: nothing worth resuming
        run.discard()  # leave no run behind when it holds only run.json
        raise


def _drop_pre_training_files(path: Path) -> None:
    """Remove what a new run wrote before training (rows, safety data, an unused secret) so discard can remove it."""
    from tunesec.defenses.finetune.backdoor_align import SECRET_FILE
    from tunesec.defenses.finetune.base import SAFETY_FILE
    from tunesec.defenses.finetune.data_filter import AUDITED_FILE

    for name in (KEPT_FILE, SAFETY_FILE, AUDITED_FILE, SECRET_FILE):
        (path / name).unlink(missing_ok=True)
    secret_dir = path / SECRET_FILE.parent
    if secret_dir.is_dir() and not any(secret_dir.iterdir()):
        secret_dir.rmdir()


def _stage(run: Any, stages: list[dict[str, Any]], record: dict[str, Any], log: Any) -> None:
    stages[:] = [s for s in stages if s["stage"] != record["stage"]] + [record]
    run.update_meta(stages=stages)
    log(f"{record['stage']}: {record.get('summary', '')} ({record.get('seconds', 0):.1f}s)")


def _run(p: ServicePlan, run: Any, *, progress: bool, log: Any, evaluate: Any = None) -> ServiceResult:
    from tunesec.attacks.base import finetune_with_provenance, write_model_ref
    from tunesec.defenses.base import _read_jsonl
    from tunesec.defenses.finetune.base import ServiceContext
    from tunesec.store.atomic import atomic_write_text

    rec = p.recipe
    stages: list[dict[str, Any]] = list(run.meta.get("stages", []))
    ctx = ServiceContext(model=p.model, run_dir=run.path, safety=rec.safety, seed=rec.seed)

    # 1. filter the user's rows (read back on resume)
    kept_path = run.path / KEPT_FILE
    started = time.perf_counter()
    if kept_path.is_file():
        kept = _read_jsonl(kept_path)
    else:
        kept, filters = list(p.examples), {}
        for d in p.defenses:
            kept, prov = d.filter_data(kept, ctx)
            if prov:
                filters[d.name] = prov
        atomic_write_text(kept_path, "".join(e.model_dump_json() + "\n" for e in kept))
        n_in = len(p.examples)
        _stage(run, stages, {"stage": "filter", "rows": n_in, "kept": len(kept), "defenses": filters,
                             "seconds": round(time.perf_counter() - started, 2),
                             "summary": f"kept {len(kept)} of {n_in} user rows"}, log)  # fmt: skip

    # 2. add the defenses' rows (deterministic: rebuilt on resume, never written: BackdoorAlign's hold the secret)
    started = time.perf_counter()
    train_rows, added = list(kept), {}
    for d in p.defenses:
        before = len(train_rows)
        train_rows, prov = d.add_data(train_rows, ctx)
        if prov or len(train_rows) != before:
            added[d.name] = prov
    extra: dict[str, list[Example]] = {}
    hooks = []
    for d in p.defenses:
        for name, rows in d.extra_datasets(ctx).items():
            extra[name] = rows
        hooks.extend(d.hooks(ctx))
    hook_names = ", ".join(h.name for h in hooks)
    _stage(run, stages, {"stage": "data", "train_rows": len(train_rows), "added": added,
                         "extra_datasets": {k: len(v) for k, v in extra.items()}, "hooks": [h.name for h in hooks],
                         "seconds": round(time.perf_counter() - started, 2),
                         "summary": f"{len(train_rows)} training rows, hooks: {hook_names or 'none'}"},
           log)  # fmt: skip

    # 3. train (resumes from the last checkpoint)
    train_dir = run.path / "train"
    secret_file = next((d.secret_path(ctx) for d in p.defenses if hasattr(d, "secret_path")), None)
    started = time.perf_counter()
    done_ref = train_dir / "model_ref.json"
    if done_ref.is_file():
        ref = ModelRef.model_validate(json.loads(done_ref.read_text(encoding="utf-8")))
    else:
        ckpts = train_dir / "checkpoints"
        resume = ckpts.is_dir() and any((c / "trainer_state.json").is_file() for c in ckpts.glob("checkpoint-*"))
        ref = finetune_with_provenance(
            component={"service": KIND},
            parent=p.model,
            examples=train_rows,
            training=rec.training,
            config_dump={"defenses": p.spec()["defenses"], "training": rec.training.model_dump(mode="json")},
            out_dir=train_dir,
            resume=resume,
            progress=progress,
            extra_provenance={"stage": "fine-tuning", "defenses": [d.name for d in p.defenses], "added": added},
            hooks=hooks,
            extra_datasets=extra or None,
        )
    if secret_file is not None:
        _link_secret(ref, secret_file)
    train_prov = ref.provenance.get("train", {})
    _stage(run, stages, {"stage": "train", "model": _spec_string(ref), "steps": train_prov.get("steps"),
                         "train_seconds": train_prov.get("seconds"), "first_loss": train_prov.get("first_loss"),
                         "last_loss": train_prov.get("last_loss"), "hooks": [h.name for h in hooks],
                         "seconds": round(time.perf_counter() - started, 2),
                         "summary": f"{train_prov.get('steps')} steps, loss {train_prov.get('last_loss')}"},
           log)  # fmt: skip

    # 4. repairs, in order, each in its own run directory inside this one
    for i, (name, cfg) in enumerate(p.repairs, start=1):
        ref = _repair(run.path / f"repair-{i}-{name}", name, cfg, ref, p, progress=progress)
        if secret_file is not None:
            _link_secret(ref, secret_file)
        rprov = ref.provenance
        _stage(run, stages, {"stage": f"repair-{i}-{name}", "model": _spec_string(ref),
                             "report": rprov.get("report"), "seconds": (rprov.get("seconds") or {}).get("total"),
                             "summary": f"{name} -> {_spec_string(ref)}"}, log)  # fmt: skip

    # 5. certification against the model the user fine-tuned
    certificate = None
    if rec.certify:
        from tunesec.store.run import RunDir

        started = time.perf_counter()
        cert_dir = run.path / "certify"
        resume_cert = cert_dir.is_dir() and (cert_dir / "run.json").is_file()
        recorded = next((s for s in stages if s["stage"] == "certify"), None)
        if resume_cert and recorded is not None and RunDir.open(cert_dir).finished:
            # killed after certification finished: its recorded verdict stands (a finished run is never resumed)
            certificate = {k: recorded[k] for k in ("decision", "exit_code", "run_dir")}
            certificate["summary"] = recorded.get("verdict")
    if rec.certify and certificate is None:
        from tunesec.certify.runner import certify as run_certify

        result = run_certify(
            p.model,
            ref,
            policy=rec.policy,
            finetune_data=kept,
            out=None if resume_cert else cert_dir,
            resume=cert_dir if resume_cert else None,
            limit=rec.certify_limit,
            progress=progress,
        )
        certificate = {"decision": str(result.verdict.decision), "exit_code": result.exit_code,
                       "summary": result.verdict.summary, "run_dir": str(cert_dir)}  # fmt: skip
        _stage(run, stages, {"stage": "certify", **certificate, "verdict": certificate["summary"],
                             "seconds": round(time.perf_counter() - started, 2),
                             "summary": f"exit code {result.exit_code}"}, log)  # fmt: skip

    service = {"run": str(run.path), "stages": [s["stage"] for s in stages]}
    prov = {**ref.provenance, "service": service, **({"secret_prompt": "stored"} if secret_file is not None else {})}
    final = ref.model_copy(update={"provenance": prov})
    write_model_ref(run.path, final)
    metrics: dict[str, Any] = {"certificate": certificate} if certificate else {}
    if evaluate is not None:
        metrics.update(evaluate(final, run) or {})
    run.finish(metrics=metrics or None, model=final.model_dump(mode="json"), stages=stages)
    return ServiceResult(run.path, final, stages, certificate, list(ctx.notes))


def _spec_string(ref: ModelRef) -> str:
    return ref.adapter if ref.adapter is not None else ref.base


def _link_secret(ref: ModelRef, secret_file: Path) -> None:
    from tunesec.models.secret_prompt import link_secret, model_dir

    d = model_dir(ref)
    if d is None:
        raise UsageError(f"backdoor-align: the tuned model {ref.base!r} has no local directory to mark")
    link_secret(d, secret_file)


def _repair(out: Path, name: str, cfg: Any, tuned: ModelRef, p: ServicePlan, *, progress: bool) -> ModelRef:
    """Run repair ``name`` into ``out`` (kept when it finished before a kill; redone when it did not)."""
    from tunesec.defenses.post import repair
    from tunesec.store.run import RunDir

    if (out / "run.json").is_file():
        if RunDir.open(out).finished and (out / "model_ref.json").is_file():
            return ModelRef.model_validate(json.loads((out / "model_ref.json").read_text(encoding="utf-8")))
        shutil.rmtree(out)  # this run's own unfinished repair: redone from the start
    path = repair(
        name,
        tuned=_spec_string(tuned),
        aligned=p.model,
        base=p.recipe.repair_base,
        overrides=cfg,
        out=out,
        progress=progress,
    )
    return ModelRef.model_validate(json.loads((Path(path) / "model_ref.json").read_text(encoding="utf-8")))


def attack_via_service(
    attack: Any,
    model: str,
    data: str | Path | Sequence[Example] | None,
    recipe: str | Path | ServiceRecipe | dict[str, Any] | None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    evaluate: Any = None,
) -> ServiceResult:
    """Run a fine-tuning attack as an API attacker: its training data goes through the service's pipeline.

    The attack only builds its data (:meth:`~tunesec.attacks.base.FineTuneAttack.prepare`); the provider's recipe
    decides filtering, defenses, training and repairs. The service run's spec records the attack and its config.

    Raises:
        UsageError: the attack is not a fine-tuning attack (it has no training data to upload).
    """
    from tunesec.attacks.base import FineTuneAttack

    if not isinstance(attack, FineTuneAttack):
        raise UsageError(
            f"--via-service: attack {attack.name!r} does not fine-tune; only fine-tuning attacks upload data"
        )
    attack.bind(model)  # the attacker knows the model it uploads for (a public base: a gradient surrogate)
    examples, prov = attack.prepare(data)
    origin = {"attack": attack.name, "config": attack.config.model_dump(mode="json"), "data": prov or {}}
    return finetune(
        model, examples, recipe=recipe, out=out, resume=resume, progress=progress, origin=origin, evaluate=evaluate
    )
