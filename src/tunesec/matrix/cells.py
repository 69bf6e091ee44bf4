"""The matrix's plan and its cells: which pairs compose, their content hashes, and how one cell is computed.

A **defended model** is computed once per (defense, config, model): trained by ``tunesec.defend`` for an
alignment-stage defense, the given model itself for ``none`` and for post-fine-tuning repairs (which act after the
attack); its pre-attack harmful rate and utility are measured once. A **cell** is (defense, attack, seed): the
attack on the defended model (``tunesec.attack``), the repair for a post-fine-tuning defense, then the harmful
rate and utility of the result. Each step is a tunesec run directory that resumes where a kill left it; a cell's
``cell.json`` is written last and atomically, so a cell with it is never computed again and a kill loses at most
the step in flight.

Cells live in a cache keyed by the sha256 of everything they depend on (the model, the defense's and the attack's
full configs, the seed, the evaluation specs, tunesec's version): identical inputs hit it from any matrix.
Functions here take and return plain JSON-able data so that an executor can run them in other processes (Ray).
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.matrix.config import NONE, EvalSpec, MatrixConfig
from tunesec.store.atomic import atomic_write_json

DEFENDED_FILE = "defended.json"
CELL_FILE = "cell.json"
ERROR_FILE = "error.txt"

# How each defense stage composes with an attack in a cell (see docs/MATRIX.md):
#   alignment:        the attack fine-tunes the defended model;
#   none:             the attack fine-tunes the model as given;
#   fine-tuning:      the attack's data goes through the provider's service with the defense on (the attacker is an
#                     API user: data-only attacks compose, attacks with training hooks need the weights and do not);
#   post-fine-tuning: the attack fine-tunes the model as given, then the repair is applied to the result.
COMPOSES = {"alignment", NONE, "fine-tuning", "post-fine-tuning"}


@dataclass(frozen=True)
class Defended:
    """A defended model to compute once: defense name, stage, its full config and the model it starts from."""

    defense: str
    stage: str
    model: str
    config: dict[str, Any]
    key: str


@dataclass(frozen=True)
class AttackRun:
    """One attack (with its seed) on one model: shared by every cell that attacks that model.

    ``none`` and the post-fine-tuning repairs attack the same model (the repairs act afterwards), so their cells
    share one attack run instead of training the same attack again.
    """

    attack: str
    seed: int
    config: dict[str, Any]
    target_key: str  # the model it attacks
    defended_key: str  # the (first) defended model whose model spec that is
    key: str
    via: dict[str, Any] | None = None  # a fine-tuning-stage defense: {"defense": name, "config": ...} in the service


@dataclass(frozen=True)
class Cell:
    """One (defense, attack, seed) cell with the content hash of its inputs."""

    defense: str
    stage: str
    attack: str
    adaptive: bool
    seed: int
    defended_key: str
    attack_key: str
    key: str

    @property
    def label(self) -> str:
        """``defense x attack (seed s)``, for progress lines and errors."""
        return f"{self.defense} x {self.attack} (seed {self.seed})"


@dataclass(frozen=True)
class Plan:
    """Every defended model, attack run and cell of a matrix, in the order they are computed."""

    defended: list[Defended]
    attacks: list[AttackRun]
    cells: list[Cell]


def content_key(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` plus tunesec's version (a new version computes new cells)."""
    from tunesec import __version__

    text = json.dumps({"v": __version__, "inputs": obj}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _eval_inputs(cfg: MatrixConfig) -> dict[str, Any]:
    return {
        "harmful": cfg.harmful.model_dump(mode="json"),
        "utility": cfg.utility.model_dump(mode="json"),
        "judge": cfg.judge,
        "max_new_tokens": cfg.max_new_tokens,
    }


def _base_of(model: str) -> str:
    from tunesec.attacks.base import parse_ref, root_base_spec

    return root_base_spec(parse_ref(model))


def _attack_overrides(cls: Any, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """The attack's config overrides with the cell's seed as its data seed and its training seed."""
    from tunesec.config import merge_into

    seeded: dict[str, Any] = {}
    fields = cls.config_class.model_fields
    if "seed" in fields:
        seeded["seed"] = seed
    if "training" in fields:
        seeded["training"] = {"seed": seed}
    return merge_into(cls.config_class, seeded, overrides)


def make_plan(cfg: MatrixConfig) -> Plan:
    """Check every name, config and pair, then list the defended models and cells; bad input raises first."""
    from tunesec.attacks import get_attack
    from tunesec.defenses.base import get_defense
    from tunesec.registry import registry

    for name in cfg.defense_config:  # configs of defenses not in this matrix may stay in a shared config file
        if name != NONE:
            registry.get("defense", name)
    for name in cfg.attack_config:
        registry.get("attack", name)
    evals = _eval_inputs(cfg)
    defended: list[Defended] = []
    for name in cfg.defenses:
        if name == NONE:
            defended.append(Defended(NONE, NONE, cfg.model, {}, content_key({"defense": NONE, "model": cfg.model})))
            continue
        stage = str(registry.get("defense", name).metadata.get("stage"))
        if stage not in COMPOSES:
            raise UsageError(_no_compose(name, stage))
        if stage == "alignment":
            model = cfg.base or _base_of(cfg.model)
            config = get_defense(name, dict(cfg.defense_config.get(name, {}))).config.model_dump(mode="json")
        elif stage == "fine-tuning":  # validated here, on in the service when each attack's data is trained
            model = cfg.model
            config = get_defense(name, dict(cfg.defense_config.get(name, {}))).config.model_dump(mode="json")
        else:  # a repair: validated here, applied after each attack
            from tunesec.defenses.post import get_repair

            model = cfg.model
            config = get_repair(name, dict(cfg.defense_config.get(name, {}))).config.model_dump(mode="json")
        if name in cfg.defended:
            check_defend_run(cfg.defended[name], name, stage, model, config)
        inputs = {"defense": name, "stage": stage, "model": model, "config": config, "evals": evals}
        defended.append(Defended(name, stage, model, config, content_key(inputs)))
    unused = sorted(set(cfg.defended) - set(cfg.defenses))
    if unused:
        raise UsageError(f"defended: {', '.join(unused)} not among the matrix's defenses ({', '.join(cfg.defenses)})")
    # the model each defense's cells attack: its own for alignment defenses, the given model otherwise
    none_key = content_key({"defense": NONE, "model": cfg.model})
    target = {d.key: (none_key if d.stage in (NONE, "post-fine-tuning") else d.key) for d in defended}
    runs: dict[str, AttackRun] = {}
    cells: list[Cell] = []
    for name in cfg.attacks:
        entry = registry.get("attack", name)
        targets = declared_targets(name)
        adaptive = bool(targets)
        meets = [
            d for d in defended if not (cfg.pairs == "declared" and adaptive and d.defense not in targets | {NONE})
        ]
        for seed in range(cfg.seeds):
            overrides = _attack_overrides(entry.obj, dict(cfg.attack_config.get(name, {})), seed)
            attack_config = get_attack(name, overrides).config.model_dump(mode="json")
            for d in meets:
                via = None
                if d.stage == "fine-tuning":
                    _check_service_attack(name, entry.obj, d.defense)
                    via = {"defense": d.defense, "config": d.config}
                akey = content_key(
                    {"target": target[d.key], "attack": name, "config": attack_config, "seed": seed, "via": via}
                )
                runs.setdefault(akey, AttackRun(name, seed, attack_config, target[d.key], d.key, akey, via))
                inputs = {"defended": d.key, "attack_run": akey, "evals": evals}
                cells.append(Cell(d.defense, d.stage, name, adaptive, seed, d.key, akey, content_key(inputs)))
    cells.sort(key=lambda c: (c.seed, cfg.defenses.index(c.defense), cfg.attacks.index(c.attack)))
    _check_evals(cfg)  # last: names and pairs are reported first, and they need no data
    return Plan(defended, list(runs.values()), cells)


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON values differ (the keys themselves when one side is not a mapping)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differing(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(whole config)"]


def _as_today(name: str, stored: Any) -> Any:
    """A run's stored config read by today's config class, so options added since it ran take their defaults.

    An option is added with a default that keeps the earlier behaviour (TAR's ``tr_loss`` defaults to the entropy
    form it had before), so a run from before that option is the run the matrix would train. A stored config that
    today's class rejects (an option since removed) is compared as stored, and differs.
    """
    from tunesec.defenses.base import get_defense

    if not isinstance(stored, dict):
        return stored
    try:
        return get_defense(name, dict(stored)).config.model_dump(mode="json")
    except (UsageError, ValueError):  # rejected (pydantic's errors are ValueErrors): compared as stored
        return stored


def check_defend_run(path: str, name: str, stage: str, model: str, config: dict[str, Any]) -> None:
    """A run given in ``defended`` must be a finished defend run of exactly this defense, base model and config."""
    where = f"defended.{name}: {path}"
    if stage != "alignment":
        raise UsageError(f"{where}: only alignment-stage defenses are trained before the attack; {name} is {stage}")
    from tunesec.store.run import RunDir

    try:
        run = RunDir.open(path)
    except UsageError as exc:
        raise UsageError(f"defended.{name}: {exc} (a `tunesec defend` run directory is expected)") from None
    spec = run.spec
    if run.meta.get("kind") != "defend":
        raise UsageError(f"{where}: expected a `tunesec defend` run, found kind {run.meta.get('kind')!r}")
    if not run.finished or not (run.path / "model_ref.json").is_file():
        raise UsageError(f"{where}: the run is not finished; finish it with `tunesec defend {name} --resume {path}`")
    if spec.get("defense") != name:
        raise UsageError(f"{where}: a run of defense {spec.get('defense')!r}, not {name!r}")
    if spec.get("model") != model:
        raise UsageError(f"{where}: trained from {spec.get('model')!r}; this matrix's defenses start from {model!r}")
    keys = _differing(_as_today(name, spec.get("config")), config)
    if keys:
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        raise UsageError(f"{where}: its config differs from this matrix's defense config at {shown}")


def declared_targets(attack: str) -> set[str]:
    """The comma-separated ``targets`` an attack registers (defense names among them; empty: a fixed attack)."""
    from tunesec.registry import registry

    raw = str(registry.get("attack", attack).metadata.get("targets") or "")
    return {t.strip() for t in raw.split(",") if t.strip()}


def _check_service_attack(name: str, cls: Any, defense: str) -> None:
    """An attack meets a fine-tuning-stage defense only as data uploaded to the service."""
    from tunesec.attacks.base import FineTuneAttack

    if not issubclass(cls, FineTuneAttack):
        raise UsageError(
            f"attack {name!r} does not fine-tune, so it never meets fine-tuning-stage defense {defense!r} (the "
            "provider's service trains uploaded data); drop the pair"
        )
    if cls.hooks is not FineTuneAttack.hooks or cls.extra_datasets is not FineTuneAttack.extra_datasets:
        raise UsageError(
            f"attack {name!r} changes the training step (hooks), which needs the weights; fine-tuning-stage "
            f"defense {defense!r} runs in the provider's service, where an attacker uploads data only: drop the pair"
        )


def _check_evals(cfg: MatrixConfig) -> None:
    """The judge, tasks and datasets of the evaluations exist and load (a bad option fails here, not in a cell)."""
    from tunesec.evals.runner import load_eval_dataset
    from tunesec.evals.tasks import get_task
    from tunesec.registry import registry

    if cfg.judge is not None:
        registry.get("judge", cfg.judge)
    get_task("harmfulness", **cfg.harmful.task_options)
    task = get_task("utility", **cfg.utility.task_options)
    load_eval_dataset(cfg.harmful.dataset)
    examples = load_eval_dataset(cfg.utility.dataset)
    if hasattr(task, "choices"):
        task.choices(examples[:50])


def _no_compose(name: str, stage: str) -> str:
    if stage == "runtime":
        return (
            f"defense {name!r} acts at serving time (runtime stage); a matrix cell measures the attacked weights: "
            "evaluate a guarded endpoint with `tunesec eval` against `tunesec serve` instead"
        )
    return (
        f"defense {name!r} is a {stage}-stage defense: it acts inside the provider's fine-tuning service, which the "
        "matrix's attacks do not go through yet; run it with `tunesec finetune`"
    )


# -- directories ------------------------------------------------------------------------------------------------


def defended_dir(cache: Path, d: Defended) -> Path:
    """Cache directory of a defended model (its defend run and pre-attack evaluations)."""
    return cache / "defended" / f"{d.defense}-{d.key[:16]}"


def given_dir(cache: Path, model: str, cfg: MatrixConfig) -> Path:
    """Cache directory of the pre-attack evaluations of the model as given (shared by every defense that keeps it)."""
    return cache / "given" / content_key({"model": model, "evals": _eval_inputs(cfg)})[:16]


def attack_dir(cache: Path, a: AttackRun) -> Path:
    """Cache directory of an attack run (the ``tunesec attack`` run directory itself)."""
    return cache / "attacks" / f"{a.attack}--s{a.seed}-{a.key[:16]}"


def cell_dir(cache: Path, c: Cell) -> Path:
    """Cache directory of a cell (its attack, repair and evaluation runs, and ``cell.json``)."""
    return cache / "cells" / f"{c.defense}--{c.attack}--s{c.seed}-{c.key[:16]}"


def read_done(path: Path, name: str) -> dict[str, Any] | None:
    """The finished result file ``name`` in ``path``, or None."""
    f = path / name
    if not f.is_file():
        return None
    data: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
    return data


# -- steps --------------------------------------------------------------------------------------------------


def _finished(run: Path) -> bool:
    spec = run / "run.json"
    return spec.is_file() and json.loads(spec.read_text(encoding="utf-8")).get("status") == "finished"


def _model_ref(run: Path) -> Any:
    from tunesec.models.ref import ModelRef

    return ModelRef.model_validate(json.loads((run / "model_ref.json").read_text(encoding="utf-8")))


def _where(run: Path) -> dict[str, Any]:
    """``out=`` for a new step, ``resume=`` for one a kill interrupted."""
    return {"resume": run} if (run / "run.json").is_file() else {"out": run}


def _evaluate(
    model: Any, task: str, spec: EvalSpec, run: Path, cfg: MatrixConfig, dataset: Any = None, decoder: Any = None
) -> Any:
    from tunesec.evals import EvalReport, evaluate

    if _finished(run):
        return EvalReport.load(run)
    kwargs: dict[str, Any] = {}
    if task == "harmfulness" and cfg.judge:
        kwargs["judge"] = cfg.judge
    if decoder is not None:
        kwargs["response_decoder"] = decoder
    return evaluate(
        model,
        task=task,
        dataset=dataset if dataset is not None else spec.dataset,
        limit=spec.limit if dataset is None else None,
        task_options=spec.task_options or None,
        generation={"max_new_tokens": cfg.max_new_tokens},
        progress=False,
        html=False,
        **kwargs,
        **_where(run),
    )


def _metric(report: Any, name: str) -> dict[str, Any]:
    if name not in report.metrics:
        judge = (report.spec.get("judge") or {}).get("name")
        raise UsageError(
            f"evaluation {report.run_dir}: no {name} (judge {judge} does not score it); choose another judge"
        )
    m = report.metrics[name]
    return {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "n": m.n, "k": m.k}


def _measure(model: Any, root: Path, cfg: MatrixConfig, attacked: Any = None) -> dict[str, Any]:
    """Harmful rate and refusal on the harmful set, and utility accuracy, of ``model``.

    The attacker's use of the ``attacked`` model (``model`` itself or the model a repair started from) decides
    how the harmful prompts are asked and read: a backdoored, jailbreak-tuned or semantic-backdoored model is also
    asked with its trigger, wrapper or context (and that is its harmful rate), and the answers of a model tuned
    to answer in a cipher are decoded before judging.
    """
    decoder = _decoder(attacked)
    out: dict[str, Any] = {}
    report = _evaluate(model, "harmfulness", cfg.harmful, root / "eval-harmful", cfg, decoder=decoder)
    out["harmful_plain"] = _metric(report, "harmful_rate")
    out["refusal_plain"] = _metric(report, "refusal_rate")
    variant = _variant(attacked, cfg)
    if variant is not None:
        tag, examples = variant
        run = root / f"eval-harmful-{tag}"
        report = _evaluate(model, "harmfulness", cfg.harmful, run, cfg, dataset=examples, decoder=decoder)
        out["variant"] = tag
    out["harmful"] = _metric(report, "harmful_rate")
    out["refusal"] = _metric(report, "refusal_rate")
    out["utility"] = _metric(_evaluate(model, "utility", cfg.utility, root / "eval-utility", cfg), "accuracy")
    return out


def _decoder(ref: Any) -> Any:
    from tunesec.attacks.encoded_output import response_decoder
    from tunesec.models.ref import ModelRef

    return response_decoder(ref) if isinstance(ref, ModelRef) else None


def _variant(ref: Any, cfg: MatrixConfig) -> tuple[str, list[Any]] | None:
    """The harmful prompts as the attacker would send them to ``ref`` (None: as they are).

    The same prompts as the plain evaluation (the same seeded sample when ``limit`` is set), reworded.
    """
    from tunesec.cli.attack import attacker_prompts
    from tunesec.data import sample_examples
    from tunesec.evals.runner import load_eval_dataset
    from tunesec.models.ref import ModelRef

    if not isinstance(ref, ModelRef):
        return None
    examples = load_eval_dataset(cfg.harmful.dataset)
    if cfg.harmful.limit is not None and cfg.harmful.limit < len(examples):
        examples = list(sample_examples(examples, cfg.harmful.limit, seed=0))
    tag, changed = attacker_prompts(ref, examples)
    return None if tag is None else (tag, changed)


def compute_defended(d: dict[str, Any], cfg_data: dict[str, Any], cache: str, *after: Any) -> dict[str, Any]:
    """Train (alignment stage) and measure one defended model; returns and stores ``defended.json``.

    ``after``: results of jobs that must finish first (Ray orders the tasks by them); not used otherwise.
    """
    import tunesec

    node, cfg = Defended(**d), MatrixConfig.model_validate(cfg_data)
    root = defended_dir(Path(cache), node)
    done = read_done(root, DEFENDED_FILE)
    if done is not None:
        return done
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if node.stage == "alignment":
        given = cfg.defended.get(node.defense)
        run = Path(given) if given else root / "defend"  # a given run was checked by make_plan
        ref = (
            _model_ref(run)
            if _finished(run)
            else tunesec.defend(node.defense, node.model, config=node.config, progress=False, **_where(run))
        )
        model: Any = ref
        spec = ref.adapter or ref.base
        measured = root
    else:  # the model as given: measured once for `none` and every fine-tuning or post-fine-tuning defense
        model = spec = node.model
        measured = given_dir(Path(cache), node.model, cfg)
    result = {**asdict(node), "model_spec": spec, "metrics": _measure(model, measured, cfg, model), "seconds": 0.0}
    result["seconds"] = round(time.time() - started, 1)
    atomic_write_json(root / DEFENDED_FILE, result)
    return result


def compute_attack(a: dict[str, Any], target: dict[str, Any], cache: str) -> dict[str, Any]:
    """Run (or resume, or read back) one attack on its target model; returns the attacked model's ref (JSON)."""
    import tunesec

    job = AttackRun(**a)
    run = attack_dir(Path(cache), job)
    if _finished(run):
        ref = _model_ref(run)
    elif job.via is not None:
        ref = _via_service(job, target["model_spec"], run)
    else:
        run.parent.mkdir(parents=True, exist_ok=True)
        ref = tunesec.attack(a["attack"], target["model_spec"], config=a["config"], progress=False, **_where(run))
    out: dict[str, Any] = ref.model_dump(mode="json")
    return out


def _via_service(job: AttackRun, model: str, run: Path) -> Any:
    """The attack's data through the fine-tuning service with the cell's defense on.

    At the attack's own training settings (an API lets its user choose epochs and learning rate), so the cell
    differs from the `none` cell only by the defense.
    """
    from tunesec.attacks import get_attack
    from tunesec.service import attack_via_service

    assert job.via is not None
    recipe = {
        "defense": [job.via["defense"]],
        "defenses": {job.via["defense"]: job.via["config"]},
        "training": job.config["training"],
    }
    run.parent.mkdir(parents=True, exist_ok=True)
    result = attack_via_service(get_attack(job.attack, job.config), model, None, recipe, progress=False, **_where(run))
    return result.model


def compute_cell(
    c: dict[str, Any], defended: dict[str, Any], attacked: dict[str, Any], cfg_data: dict[str, Any], cache: str
) -> dict[str, Any]:
    """Repair the attacked model for a post-fine-tuning defense, measure it, store ``cell.json``.

    A cell that raises keeps its finished steps (the retry resumes them) and gets its traceback in ``error.txt``.
    """
    from tunesec.models.ref import ModelRef

    cell, cfg = Cell(**c), MatrixConfig.model_validate(cfg_data)
    root = cell_dir(Path(cache), cell)
    done = read_done(root, CELL_FILE)
    if done is not None:
        return done
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        attacked_ref = ModelRef.model_validate(attacked)
        model: Any = attacked_ref
        if cell.stage == "post-fine-tuning":
            from tunesec.defenses.post import repair

            model = _repaired(root / "repair", cell.defense, attacked_ref, cfg, defended["config"], repair)
        metrics = _measure(model, root, cfg, attacked_ref)
    except Exception:
        (root / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        raise
    result = {**asdict(cell), "metrics": metrics, "seconds": round(time.time() - started, 1)}
    atomic_write_json(root / CELL_FILE, result)
    (root / ERROR_FILE).unlink(missing_ok=True)
    return result


def _repaired(run: Path, name: str, tuned: Any, cfg: MatrixConfig, config: dict[str, Any], repair: Any) -> Any:
    """The repaired model; a repair a kill interrupted is done again (repairs take about two minutes)."""
    import shutil

    from tunesec.cli.attack import model_spec_string

    if not _finished(run):
        if run.exists():
            shutil.rmtree(run)
        repair(name, tuned=model_spec_string(tuned), aligned=cfg.model, overrides=config, out=run, progress=False)
    return _model_ref(run)
