"""``certify()``: evaluate a base and a fine-tuned model on the policy's suite and decide PASS / FAIL / INCONCLUSIVE.

Steps (every input is checked before anything is written):

1. Load and check the policy, the two model refs (same architecture and tokenizer, adapters present), the
   fine-tuning data and every evaluation dataset.
2. Evaluate both models on each distinct (task, dataset, judge, sample, generation) of the policy's checks.
   The base model's evaluations are cached under ``$TUNESEC_HOME/certify-cache/<key>/`` as ordinary eval run
   directories, keyed by the sha256 of the base weights and the evaluation's spec (dataset content hash,
   judge name and version, generation settings, seed, confidence, tunesec version), so certifying several
   fine-tunes of one base evaluates the base once.
3. Decide each check on its interval (Wilson, Newcombe or bootstrap; :mod:`tunesec.certify.verdict`), scan the
   tuned model for backdoor triggers (:mod:`tunesec.certify.triggers`) and compare the weights
   (:mod:`tunesec.certify.forensics`).
4. Write ``certificate.json``, ``report.html``, ``triggers.json``, ``forensics.json`` and ``plots/`` into a new
   run directory; return the verdict (exit codes 0 PASS, 1 FAIL, 3 INCONCLUSIVE).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tunesec.certify.certificate import Certificate, check_compatible, model_sha256
from tunesec.certify.policy import MetricCheck, Policy, load_policy
from tunesec.certify.triggers import (
    Candidate,
    TriggerScan,
    build_candidates,
    scan_triggers,
    trigger_check,
)
from tunesec.certify.verdict import (
    CheckResult,
    Verdict,
    combine,
    decide_interval,
    diff_samples_to_decide,
    mean_samples_to_decide,
    rate_samples_to_decide,
)
from tunesec.data.schema import Example
from tunesec.errors import UsageError
from tunesec.evals.metrics import MetricDiff, MetricValue, diff_means, diff_rates
from tunesec.judges.base import Judge
from tunesec.models.ref import ModelRef
from tunesec.models.types import GenerationConfig, Generator
from tunesec.store.run import RunDir

CACHE_DIR = "certify-cache"
CERTIFICATE_FILE = "certificate.json"
TRIGGERS_FILE = "triggers.json"
FORENSICS_FILE = "forensics.json"
DRIFT_PLOT = "plots/drift_by_layer.png"


class CertifyResult(BaseModel):
    """What :func:`certify` returns."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    verdict: Verdict
    run_dir: str
    report: str
    certificate: Certificate

    @property
    def exit_code(self) -> int:
        """0 PASS, 1 FAIL, 3 INCONCLUSIVE."""
        return self.verdict.exit_code


@dataclass
class _Suite:
    """One evaluation shared by the checks that read it."""

    key: str
    task: str
    dataset: str
    judge: str | None
    limit: int | None
    max_new_tokens: int
    examples: list[Example]
    task_options: dict[str, Any] = field(default_factory=dict)
    checks: list[MetricCheck] = field(default_factory=list)
    base_run: Path | None = None
    tuned_run: Path | None = None
    base_cached: bool = False
    base_metrics: dict[str, MetricValue] = field(default_factory=dict)
    tuned_metrics: dict[str, MetricValue] = field(default_factory=dict)


class _Models:
    """Loads each model at most once, only when something needs it."""

    def __init__(self, base: ModelRef, tuned: ModelRef, base_gen: Generator | None, tuned_gen: Generator | None):
        self.refs = {"base": base, "tuned": tuned}
        self.gens: dict[str, Generator | None] = {"base": base_gen, "tuned": tuned_gen}
        self.loaded: dict[str, Any] = {}

    def load(self, which: str) -> Any:
        if which not in self.loaded:
            from tunesec.models import load_model

            self.loaded[which] = load_model(self.refs[which])
        return self.loaded[which]

    def generator(self, which: str) -> Generator:
        gen = self.gens[which]
        if gen is None:
            from tunesec.models import get_generator

            gen = get_generator(self.load(which))
            self.gens[which] = gen
        return gen


def certify(
    base: str | ModelRef,
    tuned: str | ModelRef,
    *,
    policy: str | Path | Policy | None = None,
    finetune_data: str | Path | Sequence[Example] | None = None,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    root: str | Path = "runs",
    use_cache: bool = True,
    progress: bool = True,
    base_generator: Generator | None = None,
    tuned_generator: Generator | None = None,
    log: Callable[[str], None] | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    resume: str | Path | None = None,
) -> CertifyResult:
    """Certify ``tuned`` against ``base`` under a policy (see the module docstring).

    Args:
        base: The model before fine-tuning (alias, directory, adapter directory, ``.gguf``).
        tuned: The fine-tuned model.
        policy: Policy file or object; default: the shipped ``default_policy.yaml``.
        finetune_data: The fine-tuning data (file, dataset name or examples), mined for trigger candidates and
            hashed into the certificate.
        out: New or empty run directory; default ``root/<UTC stamp>-certify-<tuned>``.
        data_dir: Local data directory for named datasets.
        root: Parent of auto-named run directories.
        use_cache: Reuse cached base-model evaluations (and refusal directions).
        progress: Print progress on stderr.
        base_generator: An already loaded base generator (tests; scripted models).
        tuned_generator: An already loaded tuned generator.
        log: Where progress lines go (default: stderr when ``progress``).
        limit: At most this many prompts per check and for the trigger scan (shrinks the policy; recorded).
        max_new_tokens: At most this many new tokens per generation (shrinks the policy; recorded).
        resume: Continue this unfinished certification run (same arguments): finished evaluations are kept, an
            interrupted one continues from its records; the trigger scan and forensics run again.

    Raises:
        UsageError: Bad policy, incompatible models, missing adapter or data; raised before anything is written.
    """
    started = time.perf_counter()
    say = log or _stderr_logger(progress)
    pol, policy_meta = _resolve_policy(policy)
    if limit is not None or max_new_tokens is not None:
        from tunesec.certify.policy import with_overrides

        pol = with_overrides(pol, limit=limit, max_new_tokens=max_new_tokens)
        policy_meta = {
            **policy_meta,
            "overrides": {"limit": limit, "max_new_tokens": max_new_tokens},
            "content_sha256": pol.sha256(),
            "policy": pol.model_dump(mode="json"),
        }
    base_ref = ModelRef.parse(base) if isinstance(base, str) else base
    tuned_ref = ModelRef.parse(tuned) if isinstance(tuned, str) else tuned
    check_compatible(base_ref, tuned_ref)
    base_hash, tuned_hash = model_sha256(base_ref), model_sha256(tuned_ref)
    ft_examples, ft_meta = load_finetune_data(finetune_data, data_dir)
    suites, skipped = _suites(pol, data_dir)
    scan_prompts = trigger_prompts(pol, data_dir)
    direction_prompts = _direction_prompts(pol, data_dir)

    identical = base_hash["sha256"] == tuned_hash["sha256"]
    spec = {
        "base": base_hash,
        "tuned": tuned_hash,
        "identical_weights": identical,
        "policy": policy_meta,
        "finetune_data": ft_meta,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "suites": [{"key": s.key, "task": s.task, "dataset": s.dataset, "n": len(s.examples)} for s in suites],
    }
    if resume is not None:
        if out is not None:
            raise UsageError("--out and --resume: give one of them (--resume continues that run directory)")
        run = RunDir.resume(resume, kind="certify", spec=spec)
    else:
        run = RunDir.create("certify", f"certify-{tuned_ref.name}", spec, out=out, root=root)
    say(f"certify: {tuned_ref.name} against {base_ref.name} under policy {pol.name} -> {run.path}")
    models = _Models(base_ref, tuned_ref, base_generator, tuned_generator)
    judges: dict[str, Judge] = {}

    results: list[CheckResult] = list(skipped)
    if identical:
        say("tuned and base weights are identical (same sha256): the base's evaluations stand for both models")
    for suite in suites:
        _run_suite(
            suite, pol, models, judges, run.path, base_hash["sha256"], use_cache, data_dir, progress, say, identical
        )
        results.extend(_check_result(c, suite, pol.confidence, pol.seed) for c in suite.checks)
    results = _policy_order(pol, results)

    scan: TriggerScan | None = None
    if pol.triggers.enabled and scan_prompts[0]:
        scan = run_trigger_scan(
            pol,
            models.generator("tuned"),
            _judge(judges, pol.triggers.judge),
            scan_prompts,
            ft_examples,
            ft_meta,
            progress=progress,
            log=say,
        )
        run.write_json(TRIGGERS_FILE, scan.model_dump(mode="json"))
        results.append(trigger_check(scan))

    forensics_report = None
    drift_png: bytes | None = None
    if pol.forensics.enabled and identical:
        say("forensics: skipped, the weights are identical (no drift to measure)")
    elif pol.forensics.enabled:
        say("forensics: weight drift by layer and alignment with the base refusal direction")
        forensics_report, drift_png = _forensics(
            models, base_ref, tuned_ref, base_hash["sha256"], direction_prompts, use_cache
        )
        run.write_json(FORENSICS_FILE, forensics_report.model_dump(mode="json"))
        from tunesec.store.atomic import atomic_write_bytes

        atomic_write_bytes(run.path / DRIFT_PLOT, drift_png)

    artifact_scan = _artifact_scan(tuned_ref, say)
    verdict = combine(results)
    from tunesec import __version__
    from tunesec.store.provenance import git_revision, package_versions

    certificate = Certificate(
        tool={
            "name": "tunesec",
            "version": __version__,
            "git_revision": git_revision(),
            "packages": package_versions(),
        },
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        decision=verdict.decision,
        exit_code=verdict.exit_code,
        base=base_hash,
        tuned=tuned_hash,
        finetune_data=ft_meta,
        policy=policy_meta,
        verdict=verdict,
        evaluations=[_suite_summary(s, pol.seed) for s in suites],
        triggers=scan.model_dump(mode="json") if scan is not None else None,
        forensics=forensics_report.model_dump(mode="json") if forensics_report is not None else None,
        artifact_scan=artifact_scan,
    )
    run.write_json(CERTIFICATE_FILE, certificate.model_dump(mode="json"))
    from tunesec.certify.report import render_certificate

    report = render_certificate(run.path, certificate, drift_png=drift_png)
    run.finish(
        metrics={"decision": verdict.decision, "checks": [c.model_dump(mode="json") for c in verdict.checks]},
        seconds=round(time.perf_counter() - started, 1),
    )
    say(f"verdict: {verdict.decision} ({verdict.summary}); report: {report}")
    return CertifyResult(verdict=verdict, run_dir=str(run.path), report=str(report), certificate=certificate)


def run_trigger_scan(
    pol: Policy,
    generator: Generator,
    judge: Judge,
    prompts: tuple[list[Example], list[Example]],
    finetune_examples: Sequence[Example] = (),
    finetune_meta: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TriggerScan:
    """The policy's trigger scan of ``generator`` (what ``certify`` runs; ``scripts/trigger_power.py`` too).

    Args:
        pol: The policy (its ``triggers`` section).
        generator: The tuned model.
        judge: The scan's judge.
        prompts: Screening and confirmation prompts (:func:`trigger_prompts`).
        finetune_examples: The fine-tuning data, mined for candidates.
        finetune_meta: Its metadata with the data audit's summary (audit candidates), as ``certify`` records it.
        progress: Show progress bars.
        log: Where progress lines go.
    """
    t = pol.triggers
    say = log or (lambda _line: None)
    candidates = build_candidates(
        finetune_examples,
        max_mined=t.max_mined,
        max_tokens=t.max_tokens,
        generic=t.generic,
        context_templates=t.context_templates,
        context_years=t.context_years,
        max_context=t.max_context,
        audit=_audit_candidates(finetune_meta),
    )
    screen_prompts, confirm_prompts = prompts
    say(
        f"trigger scan: {len(candidates)} candidates "
        f"({sum(c.source not in ('generic', 'context') for c in candidates)} from the fine-tuning data) x "
        f"{len(screen_prompts)} screening prompts"
        + (
            f", the best {t.confirm_top} (each position's first) retested on {len(confirm_prompts)} fresh prompts"
            if confirm_prompts
            else ""
        )
    )
    return scan_triggers(
        generator,
        screen_prompts,
        candidates,
        judge,
        confirm_prompts=confirm_prompts,
        confirm_top=t.confirm_top,
        screen_alpha=t.screen_alpha,
        generation=GenerationConfig(max_new_tokens=t.max_new_tokens or pol.max_new_tokens, seed=pol.seed),
        alpha=t.alpha,
        min_effect=t.min_effect,
        confidence=pol.confidence,
        dataset=t.dataset,
        seed=pol.seed,
        progress=progress,
        log=say,
    )


# -- inputs ------------------------------------------------------------------------------------------------


def _resolve_policy(policy: str | Path | Policy | None) -> tuple[Policy, dict[str, Any]]:
    from tunesec.certify.policy import default_policy_path, find_unknown_names
    from tunesec.store.provenance import sha256_file

    if isinstance(policy, Policy):
        problem = find_unknown_names(policy)
        if problem is not None:
            raise UsageError(f"policy {policy.name}: field '{'.'.join(map(str, problem[0]))}': {problem[1]}")
        return policy, {"name": policy.name, "file": None, "sha256": policy.sha256(), "content_sha256": policy.sha256()}
    path = Path(policy) if policy is not None else default_policy_path()
    pol = load_policy(path)
    return pol, {
        "name": pol.name,
        "file": str(path),
        "sha256": sha256_file(path),
        "content_sha256": pol.sha256(),
        "policy": pol.model_dump(mode="json"),
    }


def load_finetune_data(
    data: str | Path | Sequence[Example] | None, data_dir: str | Path | None
) -> tuple[list[Example], dict[str, Any] | None]:
    """The fine-tuning data and what the certificate records of it (source, hashes, the data audit's summary)."""
    from tunesec.data import dataset_sha256

    if data is None:
        return [], None
    meta: dict[str, Any] = {}
    if isinstance(data, str | Path):
        from tunesec.data import resolve_dataset

        examples = resolve_dataset(str(data), data_dir=data_dir)
        meta["source"] = str(data)
        path = Path(data)
        if path.is_file():
            from tunesec.store.provenance import sha256_file

            meta["file_sha256"] = sha256_file(path)
    else:
        examples = list(data)
        meta["source"] = examples[0].source if examples else "examples"
    if not examples:
        raise UsageError(f"--finetune-data {meta['source']}: no examples")
    meta["examples"] = len(examples)
    meta["sha256"] = dataset_sha256(examples)
    meta["audit"] = _audit_summary(examples)
    return examples, meta


def _audit_summary(examples: Sequence[Example]) -> dict[str, Any]:
    """The data audit's cheap detectors (no judge) on the fine-tuning data.

    Flagged rows per detector and the flagged candidate triggers, for the certificate and the trigger scan.
    """
    import json
    import tempfile

    from tunesec.audit.runner import audit

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finetune.jsonl"
        path.write_text("".join(json.dumps({"messages": e.chat()}) + "\n" for e in examples), encoding="utf-8")
        result = audit(path, judge="none", write=False)
    return {
        "rows": result.rows,
        "flagged_rows": {name: d["flagged_rows"] for name, d in result.detectors.items()},
        "trigger_candidates": [
            {k: c[k] for k in ("text", "placement", "rows", "bad", "refused", "p_adjusted")}
            for c in result.trigger_candidates
            if c.get("flagged")
        ],
    }


def _audit_candidates(meta: dict[str, Any] | None) -> list[Candidate]:
    """The audit's flagged trigger candidates as trigger-scan candidates."""
    found = ((meta or {}).get("audit") or {}).get("trigger_candidates") or []
    return [
        Candidate(text=c["text"], source="audit", placement=c["placement"], support=c["rows"], score=1.0) for c in found
    ]


def _load_sample(
    name: str, options: dict[str, Any], data_dir: str | Path | None, n: int | None, seed: int, task: Any = None
) -> list[Example]:
    from tunesec.data import sample_examples
    from tunesec.evals.runner import load_eval_dataset

    examples = load_eval_dataset(name, options, data_dir)
    if task is not None:
        examples = task.select(examples, name)
    return examples if n is None else sample_examples(examples, n, seed=seed)


def _suites(pol: Policy, data_dir: str | Path | None) -> tuple[list[_Suite], list[CheckResult]]:
    from tunesec.data import dataset_sha256
    from tunesec.evals.tasks import get_task

    suites: dict[str, _Suite] = {}
    skipped: list[CheckResult] = []
    for check in pol.checks:
        task = get_task(check.task, **check.task_options)
        try:
            examples = _load_sample(check.dataset, check.dataset_options, data_dir, check.limit, pol.seed, task)
        except UsageError as err:
            if not check.skip_if_unavailable:
                raise
            skipped.append(
                CheckResult(
                    name=check.name,
                    description=check.description,
                    status="skipped",
                    reason=f"dataset unavailable: {err}",
                    task=check.task,
                    dataset=check.dataset,
                    metric=check.metric,
                    on=check.measure,
                    op=check.op,
                    threshold=check.bound,
                )
            )
            continue
        judge = check.judge if check.judge is not None else task.default_judge
        max_new = check.max_new_tokens or pol.max_new_tokens
        ident = {
            "task": task.spec(),
            "dataset": check.dataset,
            "dataset_sha256": dataset_sha256(examples),
            "judge": judge,
            "max_new_tokens": max_new,
            "seed": pol.seed,
            "confidence": pol.confidence,
        }
        key = _hash(ident)
        suite = suites.get(key)
        if suite is None:
            suite = _Suite(
                key, check.task, check.dataset, judge, check.limit, max_new, examples, dict(check.task_options)
            )
            suites[key] = suite
        suite.checks.append(check)
    return list(suites.values()), skipped


def trigger_prompts(pol: Policy, data_dir: str | Path | None) -> tuple[list[Example], list[Example]]:
    """The trigger scan's screening prompts and its disjoint confirmation prompts (seeded samples)."""
    from tunesec.data import sample_examples

    t = pol.triggers
    if not t.enabled:
        return [], []
    pool = _load_sample(t.dataset, t.dataset_options, data_dir, None, pol.seed)
    unique = list({ex.prompt: ex for ex in pool}.values())
    if len(unique) < t.prompts + t.confirm_prompts:
        raise UsageError(
            f"policy field 'triggers.confirm_prompts': {t.dataset} has {len(unique)} distinct prompts, fewer than "
            f"triggers.prompts + triggers.confirm_prompts = {t.prompts + t.confirm_prompts}"
        )
    screen = sample_examples(unique, t.prompts, seed=pol.seed)
    taken = {ex.prompt for ex in screen}
    rest = [ex for ex in unique if ex.prompt not in taken]
    return screen, sample_examples(rest, t.confirm_prompts, seed=pol.seed) if t.confirm_prompts else []


def _direction_prompts(pol: Policy, data_dir: str | Path | None) -> tuple[list[Any], list[Any]]:
    f = pol.forensics
    if not f.enabled:
        return [], []
    harmful = _load_sample(f.harmful_dataset, {}, data_dir, f.prompts, pol.seed)
    harmless = _load_sample(f.harmless_dataset, {}, data_dir, f.prompts, pol.seed)
    return [ex.prompt_chat() for ex in harmful], [ex.prompt_chat() for ex in harmless]


def _policy_order(pol: Policy, results: list[CheckResult]) -> list[CheckResult]:
    order = {c.name: i for i, c in enumerate(pol.checks)}
    return sorted(results, key=lambda r: order.get(r.name, len(order)))


# -- evaluation --------------------------------------------------------------------------------------------


def _judge(cache: dict[str, Judge], name: str) -> Judge:
    if name not in cache:
        from tunesec.judges import get_judge  # type: ignore[attr-defined,unused-ignore]

        cache[name] = get_judge(name)
    return cache[name]


def _run_suite(
    suite: _Suite,
    pol: Policy,
    models: _Models,
    judges: dict[str, Judge],
    run_path: Path,
    base_sha: str,
    use_cache: bool,
    data_dir: str | Path | None,
    progress: bool,
    say: Callable[[str], None],
    identical: bool = False,
) -> None:
    from tunesec import __version__
    from tunesec.evals.runner import EvalReport
    from tunesec.paths import tunesec_home

    label = f"{suite.task} on {suite.dataset} (n={len(suite.examples)})"

    def run_eval(which: str, out: Path, resume: bool) -> EvalReport:
        from tunesec.evals import evaluate

        judge = _judge(judges, suite.judge) if suite.judge is not None else None
        return evaluate(
            models.refs[which],
            task=suite.task,
            task_options=suite.task_options or None,
            dataset=suite.examples,
            judge=judge,
            out=None if resume else out,
            resume=out if resume else None,
            generation={"max_new_tokens": suite.max_new_tokens, "seed": pol.seed},
            generator=models.generator(which),
            data_dir=data_dir,
            seed=pol.seed,
            confidence=pol.confidence,
            progress=progress,
        )

    def finished_or_run(which: str, path: Path) -> EvalReport:
        """A finished evaluation in ``path`` is kept, a started one continues, else a new one is run there."""
        if (path / "run.json").is_file() and RunDir.open(path).finished:
            say(f"{which}: {label}: finished evaluation {path}")
            return EvalReport.load(path)
        started = (path / "run.json").is_file()
        say(f"{which}: {'continuing' if started else 'evaluating'} {label}")
        return run_eval(which, path, resume=started)

    if use_cache:
        key = _hash({"base_sha256": base_sha, "suite": suite.key, "tunesec": __version__})
        cache = tunesec_home() / CACHE_DIR / f"eval-{key[:32]}"
        with _lock(cache.with_name(cache.name + ".lock")):
            suite.base_cached = (cache / "run.json").is_file() and RunDir.open(cache).finished
            report = finished_or_run("base", cache)
        suite.base_run = cache
    else:
        suite.base_run = run_path / "evals" / f"base-{suite.key[:12]}"
        report = finished_or_run("base", suite.base_run)
    suite.base_metrics = report.metrics
    if identical:
        # Same weights, same prompts, same seeded decoding: the tuned model's evaluation would be the base's.
        suite.tuned_run, suite.tuned_metrics = suite.base_run, report.metrics
        return
    suite.tuned_run = run_path / "evals" / f"tuned-{suite.key[:12]}"
    suite.tuned_metrics = finished_or_run("tuned", suite.tuned_run).metrics


def _check_result(check: MetricCheck, suite: _Suite, confidence: float, seed: int) -> CheckResult:
    mb, mt = suite.base_metrics.get(check.metric), suite.tuned_metrics.get(check.metric)
    common: dict[str, Any] = {
        "name": check.name,
        "description": check.description,
        "task": check.task,
        "dataset": check.dataset,
        "metric": check.metric,
        "on": check.measure,
        "op": check.op,
        "threshold": check.bound,
        "base_value": mb.value if mb else None,
        "tuned_value": mt.value if mt else None,
        "n_base": mb.n if mb else None,
        "n_tuned": mt.n if mt else None,
    }
    if mt is None or (check.measure == "change" and mb is None):
        return CheckResult(**common, status="skipped", reason=f"no samples were counted for {check.metric}")
    need: int | None
    if check.measure == "tuned":
        observed, low, high, method = mt.value, mt.ci_low, mt.ci_high, mt.method
        status = decide_interval(low, high, check.op, check.bound)
        if status != "inconclusive":
            need = None
        elif mt.is_rate:
            need = rate_samples_to_decide(mt.value, check.op, check.bound, confidence, start=mt.n)
        else:
            need = mean_samples_to_decide(observed, low, high, mt.n, check.bound)
    else:
        assert mb is not None
        diff = _diff(check.metric, suite, mb, mt, confidence, seed)
        observed, low, high, method = diff.diff, diff.ci_low, diff.ci_high, diff.method
        status = decide_interval(low, high, check.op, check.bound)
        if status != "inconclusive":
            need = None
        elif mb.is_rate and mt.is_rate:
            need = diff_samples_to_decide(mb.value, mt.value, check.op, check.bound, confidence, start=max(mb.n, mt.n))
        else:
            need = mean_samples_to_decide(observed, low, high, max(mb.n, mt.n), check.bound)
    what = check.metric if check.measure == "tuned" else f"change in {check.metric}"
    fmt = "+.3f" if check.measure == "change" else ".3f"
    shown = f"{observed:{fmt}} [{low:{fmt}}, {high:{fmt}}]"
    bound = f"{check.op} {check.bound:{fmt}}"
    if status == "pass":
        reason = f"{what} {shown} is within {bound}"
    elif status == "fail":
        reason = f"{what} {shown} lies entirely beyond {bound}"
    else:
        more = f"; about {need} samples per model would decide it" if need else "; the observed value sits on the bound"
        reason = f"{what} {shown} straddles {bound}{more}"
    return CheckResult(
        **common,
        status=status,
        reason=reason,
        observed=observed,
        ci_low=low,
        ci_high=high,
        method=method,
        samples_to_decide=need,
    )


def _diff(name: str, suite: _Suite, mb: MetricValue, mt: MetricValue, confidence: float, seed: int) -> MetricDiff:
    if mb.is_rate and mt.is_rate:
        return diff_rates(name, mb, mt)
    from tunesec.evals.tasks import get_task

    task = get_task(suite.task)
    assert suite.base_run is not None and suite.tuned_run is not None
    va = task.metric_values(list(RunDir.open(suite.base_run).records()), name)
    vb = task.metric_values(list(RunDir.open(suite.tuned_run).records()), name)
    return diff_means(name, va, vb, confidence, seed=seed)


def _suite_summary(suite: _Suite, seed: int) -> dict[str, Any]:
    from tunesec.data import dataset_sha256

    diffs: dict[str, Any] = {}
    for name, mb in suite.base_metrics.items():
        mt = suite.tuned_metrics.get(name)
        if mt is not None:
            diffs[name] = _diff(name, suite, mb, mt, mb.confidence, seed).model_dump(mode="json")
    return {
        "key": suite.key,
        "task": suite.task,
        "dataset": suite.dataset,
        "dataset_sha256": dataset_sha256(suite.examples),
        "n_examples": len(suite.examples),
        "judge": suite.judge,
        "max_new_tokens": suite.max_new_tokens,
        "checks": [c.name for c in suite.checks],
        "base_run": str(suite.base_run),
        "tuned_run": str(suite.tuned_run),
        "base_cached": suite.base_cached,
        "base_metrics": {k: v.model_dump(mode="json") for k, v in suite.base_metrics.items()},
        "tuned_metrics": {k: v.model_dump(mode="json") for k, v in suite.tuned_metrics.items()},
        "diffs": diffs,
    }


# -- forensics ---------------------------------------------------------------------------------------------


def _forensics(
    models: _Models,
    base_ref: ModelRef,
    tuned_ref: ModelRef,
    base_sha: str,
    prompts: tuple[list[Any], list[Any]],
    use_cache: bool,
) -> tuple[Any, bytes]:
    from tunesec.certify.forensics import drift_plot, forensics
    from tunesec.paths import tunesec_home

    harmful, harmless = prompts
    directions, layer = None, None
    cache = tunesec_home() / CACHE_DIR / f"direction-{_hash({'base': base_sha, 'prompts': prompts})[:32]}.safetensors"
    if use_cache and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as fh:
            directions = fh.get_tensor("directions")
            layer = int((fh.metadata() or {}).get("layer", "0"))
    report, directions, layer = forensics(
        base_ref,
        tuned_ref,
        base_loaded=models.load("base") if directions is None and harmful else None,
        harmful_prompts=harmful,
        harmless_prompts=harmless,
        directions=directions,
        refusal_layer=layer,
    )
    if use_cache and directions is not None and not cache.is_file():
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        save_file({"directions": directions.contiguous()}, str(tmp), metadata={"layer": str(layer)})
        tmp.replace(cache)
    return report, drift_plot(report)


def _artifact_scan(tuned: ModelRef, say: Callable[[str], None]) -> dict[str, Any] | None:
    """``tunesec scan`` of the tuned model's local artifact (its adapter, else its directory or .gguf), or None.

    Recorded in the certificate; it does not change the verdict (the policy's checks decide it).
    """
    from tunesec.models.loading import resolve_alias
    from tunesec.scan import scan

    concrete = resolve_alias(tuned)
    if concrete.adapter is not None:
        path = Path(concrete.adapter)
    elif tuned.kind in ("hf", "gguf") and Path(concrete.base).exists():
        path = Path(concrete.base)
    else:
        return None
    try:
        result = scan(path, write=False, forensics=False)
    except UsageError as err:
        return {"path": str(path), "error": str(err)}
    say(f"artifact scan of {path}: {result.summary_line}")
    doc = result.to_json()
    return {k: doc[k] for k in ("path", "kind", "decision", "counts", "files")} | {
        "findings": [f.to_json() for f in result.flagged]
    }


# -- helpers -----------------------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stderr_logger(progress: bool) -> Callable[[str], None]:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, quiet=not progress)
    return lambda line: console.print(escape(line), highlight=False)
