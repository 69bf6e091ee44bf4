"""``evaluate()``: run a task on a model into a resumable run directory and return an :class:`EvalReport`.

The run directory (DESIGN.md) gets ``run.json`` first (the spec: model ref, task, dataset name, options and
sha256, judge name and version, generation config, seed), then ``records.jsonl`` one line per finished sample,
appended after each chunk of generations, so a kill loses at most one chunk and ``resume=DIR`` generates only
the missing ids. ``metrics.json`` (the report) and ``report.html`` are written at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesec.data.mixing import dataset_sha256
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.evals.metrics import DEFAULT_CONFIDENCE, MetricValue
from tunesec.evals.tasks import Task, get_task
from tunesec.judges.base import Judge
from tunesec.models.types import GenerationConfig, Generator
from tunesec.store.run import METRICS_FILE, RunDir

REPORT_FORMAT = 1
DEFAULT_CHUNK = 64


class EvalReport(BaseModel):
    """The result of one evaluation: metrics with intervals plus everything that produced them.

    Attributes:
        task: Task name.
        metrics: Metric name -> value with confidence interval and per-category breakdown.
        spec: Model ref, task, dataset (name, options, limit, sha256), judge (name, version), generation
            config, seed, confidence level, plus ``provenance`` (package versions, git revision).
        counts: Examples, records, resumed and newly generated samples, unparsed judgements, truncations.
        timing: Seconds: this session's wall time and the summed generation and judge time of all records.
        run_dir: Where the run lives (``None`` for a report built in memory).
        format: Report format version.
    """

    model_config = ConfigDict(extra="forbid")

    task: str
    metrics: dict[str, MetricValue]
    spec: dict[str, Any]
    counts: dict[str, int] = Field(default_factory=dict)
    timing: dict[str, float] = Field(default_factory=dict)
    run_dir: str | None = None
    format: int = REPORT_FORMAT

    @property
    def label(self) -> str:
        """What was measured, in a few words: task, dataset and the options that change results."""
        return run_label(self.spec.get("task") or {"name": self.task}, self.spec.get("dataset") or {})

    @property
    def headline(self) -> MetricValue | None:
        """The task's first metric (``harmful_rate``, ``refusal_rate`` or ``accuracy``)."""
        return next(iter(self.metrics.values()), None)

    @classmethod
    def load(cls, run_dir: str | Path) -> EvalReport:
        """Read ``metrics.json`` from a finished evaluation run."""
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            raise UsageError(f"{Path(run_dir)}: no {METRICS_FILE}; is it a finished evaluation run?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{path}: unreadable metrics file ({err})") from None
        try:
            return cls.model_validate(data)
        except ValueError as err:
            first = str(err).splitlines()[0]
            raise UsageError(f"{path}: not an evaluation report ({first})") from None


def load_eval_dataset(
    dataset: str, options: Mapping[str, Any] | None = None, data_dir: str | Path | None = None
) -> list[Example]:
    """Load a named dataset (``advbench``, ``xstest`` ...) or a file/directory path into examples.

    Args:
        dataset: A registered dataset name, or a path to a csv/json/jsonl/parquet file or dataset directory.
        options: Loader options (e.g. ``subset="safe"`` for XSTest).
        data_dir: Local data directory for named datasets (else ``$TUNESEC_DATA`` or ``../shared/data``).
    """
    from tunesec.data import resolve_dataset

    examples: list[Example] = resolve_dataset(dataset, data_dir=data_dir, **dict(options or {}))
    if not examples:
        raise UsageError(f"dataset {dataset}: no examples")
    return examples


def evaluate(
    model: Any,
    task: str | Task | None = None,
    dataset: str | Sequence[Example] | None = None,
    judge: str | Judge | None = None,
    judge_options: Mapping[str, Any] | None = None,
    *,
    task_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    generator: Generator | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    chunk_size: int = DEFAULT_CHUNK,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    root: str | Path = "runs",
    progress: bool = True,
    html: bool = True,
    response_decoder: Callable[[str], str] | None = None,
) -> EvalReport:
    """Evaluate ``model`` on a task and write a run directory.

    Args:
        model: Model spec string (alias, directory, ``.gguf``, hub id, ``openai:NAME``) or ``ModelRef``;
            with an injected ``generator`` any label that names it.
        task: Task name (``harmfulness``, ``over-refusal``, ``utility``) or instance; default ``harmfulness``,
            or the resumed run's task.
        dataset: Dataset name or path, or the examples themselves; default: the task's dataset.
        judge: Judge name or instance; default: the task's judge (the utility task uses none).
        judge_options: Arguments for a named judge, e.g. ``{"grader": "openai:gpt-4o-mini"}`` for
            ``strongreject-rubric`` or ``{"model": "meta-llama/Llama-Guard-3-1B"}`` for ``guard-model``.
        task_options: Arguments for a named task, e.g. ``{"scoring": "choices"}`` for ``utility``.
        limit: Evaluate a seeded sample of this many examples (stratified by category when the data module
            provides sampling).
        out: New or empty directory for the run; default ``root/<UTC stamp>-<task>-<model>``.
        resume: Continue this unfinished run: finished samples are kept, only missing ids are generated.
            Arguments left out are taken from the run's spec; given ones must match it.
        generation: Decoding settings, or a mapping of overrides on the task's defaults
            (e.g. ``{"max_new_tokens": 64}``).
        generator: An already loaded generator (tests, certification reusing a model).
        dataset_options: Loader options, e.g. ``{"subset": "safe"}``; default: the task's for its dataset.
        data_dir: Local data directory for named datasets.
        seed: Seed for sampling ``limit`` examples, decoding and bootstrap intervals.
        confidence: Confidence level of the intervals.
        chunk_size: Prompts generated and appended per chunk; a kill loses at most one chunk.
        allow_pickle: Let the model loader accept pickle weight files (off: safetensors only).
        trust_remote_code: Let the model loader run the hub's modelling code (off by default).
        root: Parent directory of auto-named runs.
        progress: Show progress bars and per-chunk lines on stderr.
        html: Render ``report.html`` at the end.
        response_decoder: Applied to every generated response before it is judged or parsed (an attack that
            makes the model answer in an encoding, ``encoded-output``, provides it); records keep the raw text in
            ``raw_response``. Labels picked by ``scoring="choices"`` are not decoded. Its ``name`` attribute goes
            into the run spec, so a run cannot be resumed with another decoder or none.

    Returns:
        The :class:`EvalReport`, also written to ``metrics.json`` in the run directory.
    """
    started = time.perf_counter()
    prior: dict[str, Any] = RunDir.open(resume).spec if resume is not None else {}

    task_obj = _resolve_task(task, prior, task_options)
    examples, dataset_spec = _resolve_dataset(task_obj, dataset, dataset_options, data_dir, limit, seed, prior)
    judge_obj = _resolve_judge(task_obj, judge, prior, judge_options)
    gen_config = _resolve_generation(task_obj, examples, generation, seed, prior)

    model_spec, model_name = _model_spec(model, generator)
    if task_obj.choices(examples[:1]) is not None and not _can_choose(model, generator):
        raise _no_choices(model_name, task_obj)
    if task_obj.prefills(examples) is not None:
        if not _can_prefill(model, generator):
            raise _no_prefill(model_name, task_obj)
        gen_config = gen_config.model_copy(update={"continue_final_message": True})
    spec: dict[str, Any] = {
        "task": task_obj.spec(),
        "model": model_spec,
        "dataset": dataset_spec,
        "judge": judge_obj.spec() if judge_obj is not None else None,
        # The batch size changes speed, not outputs (each prompt has its own seeded stream), so a run may be
        # resumed with another one.
        "generation": gen_config.model_dump(mode="json", exclude={"batch_size"}),
        "seed": seed,
        "confidence": confidence,
    }
    if response_decoder is not None:
        spec["response_decoder"] = str(getattr(response_decoder, "name", "custom"))
    if resume is not None:
        run = RunDir.resume(resume, kind="eval", spec=spec)
    else:
        run = RunDir.create("eval", f"{run_label(spec['task'], dataset_spec)}-{model_name}", spec, out=out, root=root)

    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    done = run.done_ids()
    todo = [ex for ex in examples if ex.id not in done]
    if generator is None and todo:
        generator = _load_generator(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    n_chunks = (len(todo) + chunk_size - 1) // chunk_size
    if done:
        console.print(f"[bold]{task_obj.name}[/]: resuming {run.path}: {len(examples) - len(todo)} done")
    for i in range(n_chunks):
        chunk = todo[i * chunk_size : (i + 1) * chunk_size]
        assert generator is not None
        prompts = task_obj.build_prompts(chunk)
        t_gen = time.perf_counter()
        choice_sets = task_obj.choices(chunk)
        if task_obj.prefills(chunk) is not None and not getattr(generator, "prefills", False):
            raise _no_prefill(model_name, task_obj)  # a backend picked at load time that cannot continue answers
        if choice_sets is None:
            gens = generator.generate(prompts, gen_config, progress=progress)
        else:
            choose = getattr(generator, "choose", None)
            if choose is None:  # a backend picked at load time (vLLM) that gives no log-probabilities
                raise _no_choices(model_name, task_obj)
            gens = choose(prompts, choice_sets, gen_config, progress=progress)
        raw = [g.text for g in gens]
        decoder = response_decoder if choice_sets is None else None  # a chosen label is not model-written text
        if decoder is not None:
            gens = [g.model_copy(update={"text": decoder(g.text)}) for g in gens]
        t_judge = time.perf_counter()
        # A backend may report batch time on each generation; the chunk's wall time shared out is additive.
        gen_each = (t_judge - t_gen) / max(1, len(chunk))
        records = task_obj.score(chunk, gens, judge_obj)
        judge_each = (time.perf_counter() - t_judge) / max(1, len(chunk))
        for rec, text in zip(records, raw, strict=True):
            if decoder is not None:
                rec["raw_response"] = text
            rec["gen_share_seconds"] = round(gen_each, 4)
            rec["judge_seconds"] = round(judge_each, 4)
        run.append_many(records)
        finished = len(examples) - len(todo) + (i * chunk_size) + len(chunk)
        console.print(
            f"[bold]{task_obj.name}[/]: {finished}/{len(examples)} samples "
            f"(chunk {i + 1}/{n_chunks}, {time.perf_counter() - started:.0f}s)"
        )

    wanted = {ex.id for ex in examples}
    records = [r for r in run.records() if str(r.get("id")) in wanted]
    if len({str(r["id"]) for r in records}) != len(examples):
        raise RuntimeError(f"{run.path}: {len(records)} records for {len(examples)} examples")
    report = EvalReport(
        task=task_obj.name,
        metrics=task_obj.metrics(records, confidence=confidence, seed=seed),
        spec={**spec, "provenance": run.meta.get("provenance", {})},
        counts=_counts(records, len(examples), len(examples) - len(todo)),
        timing={
            "wall_s": round(time.perf_counter() - started, 3),
            "generation_s": round(sum(float(r.get("gen_share_seconds") or 0) for r in records), 3),
            "judge_s": round(sum(float(r.get("judge_seconds") or 0) for r in records), 3),
        },
        run_dir=str(run.path),
    )
    run.write_json(METRICS_FILE, report.model_dump(mode="json"))
    # Finished before the report is rendered, so that the report shows the run's final status.
    run.finish()
    if html:
        from tunesec.evals.report import render_report

        render_report(run.path)
    return report


def _resolve_task(task: str | Task | None, prior: Mapping[str, Any], options: Mapping[str, Any] | None) -> Task:
    if isinstance(task, Task):
        if options:
            raise UsageError("task_options: give them to the task instance, not with one")
        return task
    stored = prior.get("task") or {}
    if task is None:
        if stored:
            stored_options = {k: v for k, v in stored.items() if k != "name"}
            return get_task(str(stored["name"]), **{**stored_options, **(options or {})})
        task = "harmfulness"
    return get_task(task, **(options or {}))


def _resolve_dataset(
    task: Task,
    dataset: str | Sequence[Example] | None,
    options: Mapping[str, Any] | None,
    data_dir: str | Path | None,
    limit: int | None,
    seed: int,
    prior: Mapping[str, Any],
) -> tuple[list[Example], dict[str, Any]]:
    stored = prior.get("dataset") or {}
    if dataset is None and stored:
        dataset, options = stored.get("name"), stored.get("options")
        limit = stored.get("limit") if limit is None else limit
    if limit is not None and limit < 1:
        raise UsageError(f"--limit: expected a positive number of examples, got {limit}")
    if dataset is None:
        dataset = task.default_dataset
    if isinstance(dataset, str):
        if options is None:
            options = task.default_dataset_options if dataset == task.default_dataset else {}
        name = dataset
        examples = load_eval_dataset(dataset, options, data_dir)
    else:
        examples = list(dataset)
        name = examples[0].source if examples and examples[0].source else "examples"
        options = dict(options or {})
        if not examples:
            raise UsageError("dataset: no examples")
    examples = task.select(examples, name)
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise UsageError(f"dataset {name}: duplicate example id {ex.id!r}; ids must be unique to resume")
        seen.add(ex.id)
    if limit is not None and limit < len(examples):
        examples = _sample(examples, limit, seed)
    spec = {
        "name": name,
        "options": dict(options),
        "limit": limit,
        "n_examples": len(examples),
        "sha256": dataset_sha256(examples),
    }
    return examples, spec


def run_label(task_spec: Mapping[str, Any], dataset_spec: Mapping[str, Any]) -> str:
    """``task dataset[:opt=val] [task opt=val]``, e.g. ``harmfulness advbench prefill=target``.

    Used in run directory names and table titles, so that runs on other data or with the prefilling attack are
    told apart at a glance.
    """
    parts = [str(task_spec.get("name", "task"))]
    name = str(dataset_spec.get("name") or "")
    if name:
        name = Path(name).stem if ("/" in name or "." in name) else name
        opts = ",".join(f"{k}={v}" for k, v in sorted((dataset_spec.get("options") or {}).items()))
        parts.append(f"{name}:{opts}" if opts else name)
    parts += [f"{k}={v}" for k, v in sorted(task_spec.items()) if k != "name" and v not in (None, "", {}, [])]
    return " ".join(parts)


def _sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    from tunesec.data import sample_examples

    return list(sample_examples(examples, n, seed=seed))


def _resolve_judge(
    task: Task, judge: str | Judge | None, prior: Mapping[str, Any], options: Mapping[str, Any] | None = None
) -> Judge | None:
    if isinstance(judge, Judge):
        return judge
    if task.default_judge is None:
        if judge is not None:
            raise UsageError(f"--judge {judge}: task {task.name} scores its own answers and uses no judge")
        return None
    if judge is None:
        stored = prior.get("judge") or {}
        judge = str(stored.get("name") or task.default_judge)
    from tunesec.judges import get_judge  # type: ignore[attr-defined,unused-ignore]

    result: Judge = get_judge(judge, **dict(options or {}))
    return result


def _resolve_generation(
    task: Task,
    examples: Sequence[Example],
    generation: GenerationConfig | Mapping[str, Any] | None,
    seed: int,
    prior: Mapping[str, Any],
) -> GenerationConfig:
    if isinstance(generation, GenerationConfig):
        return generation
    base: dict[str, Any] = dict(prior.get("generation") or {}) or {
        "max_new_tokens": task.default_max_new_tokens(examples),
        "seed": seed,
    }
    base.update(generation or {})
    from tunesec.config import validate

    return validate(GenerationConfig, base, "generation")


def _model_spec(model: Any, generator: Generator | None) -> tuple[dict[str, Any], str]:
    """The model's ref and weight hashes (what makes results comparable), and a short name for the run dir."""
    from tunesec.models.fingerprint import fingerprint
    from tunesec.models.ref import ModelRef

    if isinstance(model, ModelRef):
        return fingerprint(model), model.name
    loaded_ref = getattr(getattr(generator, "loaded", None), "ref", None)
    if isinstance(loaded_ref, ModelRef):
        return {"name": str(model), **fingerprint(loaded_ref)}, loaded_ref.name
    if generator is not None:
        return {"name": str(model), "generator": getattr(generator, "name", type(generator).__name__)}, str(model)
    ref = ModelRef.parse(str(model))
    return fingerprint(ref), ref.name


def _no_choices(model_name: str, task: Task) -> UsageError:
    return UsageError(
        f"model {model_name}: task {task.name} with scoring=choices needs token log-probabilities, "
        "which this backend does not give; use scoring=generate"
    )


def _is_local(model: Any) -> bool:
    """Whether ``model`` names a local model (not an OpenAI-compatible endpoint)."""
    from tunesec.models.ref import ModelRef

    ref = model if isinstance(model, ModelRef) else ModelRef.parse(str(model))
    return not ref.is_endpoint


def _can_choose(model: Any, generator: Generator | None) -> bool:
    """Whether the backend scores choices: an injected generator with ``choose``, or a local (non-API) model."""
    if generator is not None:
        return callable(getattr(generator, "choose", None))
    return _is_local(model)


def _no_prefill(model_name: str, task: Task) -> UsageError:
    return UsageError(
        f"model {model_name}: task {task.name} with prefill needs a backend that continues a given answer "
        "(a local model); a chat endpoint does not"
    )


def _can_prefill(model: Any, generator: Generator | None) -> bool:
    """Whether the backend continues a prefilled answer: a generator that says so, or a local (non-API) model."""
    if generator is not None:
        return bool(getattr(generator, "prefills", False))
    return _is_local(model)


def _load_generator(model: Any, *, allow_pickle: bool, trust_remote_code: bool) -> Generator:
    from tunesec.models import get_generator  # type: ignore[attr-defined,unused-ignore]

    gen: Generator = get_generator(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return gen


def _counts(records: Sequence[Mapping[str, Any]], n_examples: int, n_resumed: int) -> dict[str, int]:
    return {
        "examples": n_examples,
        "records": len(records),
        "resumed": n_resumed,
        "generated": n_examples - n_resumed,
        "unparsed": sum(1 for r in records if r.get("unparsed") or ("parsed" in r and r["parsed"] is None)),
        "truncated": sum(1 for r in records if r.get("finish_reason") == "length"),
        "errors": sum(1 for r in records if r.get("finish_reason") == "error"),
    }
