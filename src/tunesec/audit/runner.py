"""``audit()``: stream a fine-tuning file through the detectors, decide under the policy, write the results.

Passes over the data (each streams; nothing holds the whole file):

1. Every row: cheap signals (:mod:`tunesec.audit.screen`), the judge for the rows the harmful detector's screen
   leaves, then every detector's ``observe``.
2. Only when a dataset-level detector flagged something (a trigger, a template): its rows are collected.
3. Only for ``--filter`` or the report's examples: kept rows are written, example rows are read.

The run directory holds ``audit.json`` (every finding with row, location, detector, score and reason; the
per-detector summary; the candidate triggers; skipped rows), ``report.html`` and ``plots/``. The exit code is 0
when no detector flags more than its ``max_share`` of the rows, 1 otherwise (2 is a usage error, raised before
anything is written).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesec.audit.base import Detector, DetectorConfig, Finding, Row
from tunesec.audit.policy import AuditPolicy, load_audit_policy
from tunesec.audit.rows import ReadStats, iter_rows
from tunesec.audit.screen import compute_signals
from tunesec.errors import UsageError

AUDIT_FILE = "audit.json"
REMOVED_FILE = "removed.jsonl"


@dataclass
class AuditResult:
    """What an audit found and where it wrote it."""

    rows: int
    findings: list[Finding]
    detectors: dict[str, dict[str, Any]]
    exit_code: int
    run_dir: str | None = None
    filtered: dict[str, Any] | None = None
    skipped: int = 0
    seconds: float = 0.0
    trigger_candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary_line(self) -> str:
        """One line: rows, flagged rows per detector, the decision."""
        parts = [f"{n}: {d['flagged_rows']}" for n, d in self.detectors.items() if d["flagged_rows"]]
        verdict = "FINDINGS" if self.exit_code else "CLEAN"
        return f"{verdict}: {self.rows} rows; flagged rows by detector: {', '.join(parts) or 'none'}"


def _chunks(rows: Iterator[tuple[Row, str]], size: int) -> Iterator[list[tuple[Row, str]]]:
    chunk: list[tuple[Row, str]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_detectors(configs: dict[str, DetectorConfig], judge: str | None) -> list[Detector]:
    """The enabled detectors, the harmful one with its judge (``judge="none"`` disables it)."""
    from tunesec.registry import registry

    out: list[Detector] = []
    for name, cfg in configs.items():
        if not cfg.enabled:
            continue
        cls = registry.get("detector", name).obj
        if getattr(cls, "needs_judge", False):
            judge_name = judge if judge is not None else getattr(cfg, "judge", "default")
            if judge_name == "none":
                continue
            from tunesec.judges import get_judge

            out.append(cls(cfg, judge=get_judge(judge_name)))
        else:
            out.append(cls(cfg))
    return out


def audit(
    source: str | Path,
    *,
    policy: str | Path | None = None,
    out: str | Path | None = None,
    root: str | Path = "runs",
    filter_path: str | Path | None = None,
    judge: str | None = None,
    strict: bool | None = None,
    write: bool = True,
    progress: Callable[[int], None] | None = None,
    detectors: list[Detector] | None = None,
) -> AuditResult:
    """Audit a fine-tuning data file (see the module docstring).

    Args:
        source: csv/tsv/json/jsonl/parquet file or saved ``datasets`` directory.
        policy: Audit policy YAML (default: every detector with its defaults).
        out: New or empty run directory (default: ``root/<UTC stamp>-audit-<file stem>``).
        root: Parent of auto-named run directories.
        filter_path: Write the rows that pass here (JSONL); it must not exist.
        judge: Judge of the harmful detector (overrides the policy); ``"none"`` skips that detector.
        strict: Fail on the first malformed row (overrides the policy).
        write: Write the run directory (False: only return the result; ``certify`` uses this).
        progress: Called with the number of rows read so far, after each chunk.
        detectors: Detectors to use instead of the policy's (tests).

    Raises:
        UsageError: bad policy, missing/empty/unreadable file, an existing ``filter_path``, a non-empty ``out``;
            all raised before anything is written.
    """
    from tunesec.store.run import RunDir

    started = time.perf_counter()
    pol, configs = load_audit_policy(policy)
    strict_ = pol.strict if strict is None else strict
    if filter_path is not None and Path(filter_path).exists():
        raise UsageError(f"{filter_path}: exists; --filter writes a new file and never overwrites one")
    if filter_path is not None and not Path(filter_path).resolve().parent.is_dir():
        raise UsageError(f"{filter_path}: its folder does not exist")
    dets = detectors if detectors is not None else build_detectors(configs, judge)
    stats = ReadStats()
    stream = _chunks(iter_rows(source, strict=strict_, stats=stats), pol.chunk_size)
    first = next(stream)  # reads and checks the start of the file before anything is written
    run = None
    if write:
        spec = {"source": str(source), "policy": pol.model_dump(mode="json"), "judge": judge,
                "detectors": {d.name: d.config.model_dump(mode="json") for d in dets}}  # fmt: skip
        run = RunDir.create("audit", f"audit-{Path(source).stem}", spec, out=out, root=root)
    harmful = [d for d in dets if getattr(d, "needs_judge", False)]
    where_kind = first[0][0].where.split(" ")[0]
    where_num = array("q")
    n = 0
    try:
        for chunk in _with_first(first, stream):
            rows = [r for r, _ in chunk]
            for r in rows:
                compute_signals(r)
                where_num.append(int(r.where.split(" ")[-1]))
            for h in harmful:
                h.judge_rows(rows)  # type: ignore[attr-defined]
            for d in dets:
                d.observe(rows)
            n += len(rows)
            if progress is not None:
                progress(n)
        revisit = [d for d in dets if getattr(d, "needs_revisit", False) and d.plan(n)]  # type: ignore[attr-defined]
        if revisit:
            for chunk in _chunks(iter_rows(source, strict=False), pol.chunk_size):
                rows = [r for r, _ in chunk]
                for d in revisit:
                    d.revisit(rows)  # type: ignore[attr-defined]
    except BaseException:
        if run is not None:
            run.discard()
        raise
    findings = [f for d in dets for f in d.finish(n)]
    decisions = _decide(dets, findings, n)
    exit_code = int(any(d["failed"] for d in decisions.values()))
    triggers: list[dict[str, Any]] = next((d.summary()["candidates"] for d in dets if d.name == "triggers"), [])

    def where(i: int) -> str:
        return f"{where_kind} {where_num[i]}" if 0 <= i < len(where_num) else ""

    result = AuditResult(
        rows=n,
        findings=findings,
        detectors=decisions,
        exit_code=exit_code,
        run_dir=str(run.path) if run is not None else None,
        skipped=stats.skipped,
        trigger_candidates=triggers,
    )
    removed = {i for f in findings if configs.get(f.detector, DetectorConfig()).filter for i in f.rows}
    examples = _example_rows(findings, pol.max_examples) if run is not None else set()
    texts: dict[int, dict[str, str]] = {}
    if filter_path is not None or examples:
        texts = _final_pass(source, pol.chunk_size, examples, removed, filter_path)
    if filter_path is not None:
        result.filtered = {"path": str(filter_path), "kept": n - len(removed), "removed": len(removed)}
    result.seconds = round(time.perf_counter() - started, 2)
    if run is not None:
        doc = _document(result, source, pol, stats, dets, where)
        run.write_json(AUDIT_FILE, doc)
        if filter_path is not None:
            lines = "".join(
                json.dumps(
                    {"row": i, "where": where(i), "detectors": sorted({f.detector for f in findings if i in f.rows})}
                )
                + "\n"
                for i in sorted(removed)
            )
            (run.path / REMOVED_FILE).write_text(lines, encoding="utf-8")
        from tunesec.audit.report import render_audit_report

        render_audit_report(run.path, doc, texts)
        run.finish(metrics={"exit_code": exit_code, "rows": n}, seconds=result.seconds)
    return result


def _with_first(first: list[tuple[Row, str]], rest: Iterator[list[tuple[Row, str]]]) -> Iterator[list[tuple[Row, str]]]:
    yield first
    yield from rest


def _decide(dets: list[Detector], findings: list[Finding], n: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in dets:
        mine = [f for f in findings if f.detector == d.name]
        rows = {i for f in mine for i in f.rows}
        share = len(rows) / max(1, n)
        out[d.name] = {
            "findings": len(mine),
            "flagged_rows": len(rows),
            "share": round(share, 6),
            "max_share": d.config.max_share,
            "failed": share > d.config.max_share,
            **d.summary(),
        }
    return out


def _example_rows(findings: list[Finding], k: int) -> set[int]:
    per: dict[str, list[int]] = {}
    for f in findings:
        got = per.setdefault(f.detector, [])
        for i in f.rows:
            if len(got) < k and i not in got:
                got.append(i)
    return {i for rows in per.values() for i in rows}


def _final_pass(
    source: str | Path, chunk_size: int, examples: set[int], removed: set[int], filter_path: str | Path | None
) -> dict[int, dict[str, str]]:
    """Example rows' texts; with ``filter_path``, the kept rows written there (atomically, never over a file)."""
    texts: dict[int, dict[str, str]] = {}
    fh = None
    tmp = ""
    target = Path(filter_path) if filter_path is not None else Path()
    if filter_path is not None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
        fh = os.fdopen(fd, "w", encoding="utf-8")
    try:
        for chunk in _chunks(iter_rows(source, strict=False), chunk_size):
            for row, raw in chunk:
                if row.index in examples:
                    texts[row.index] = {"system": row.system, "user": row.user, "assistant": row.assistant}
                if fh is not None and row.index not in removed:
                    fh.write(raw + "\n")
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            fh = None
            try:
                os.link(tmp, target)  # fails if the target appeared meanwhile: never overwrite
            except FileExistsError:
                raise UsageError(
                    f"{filter_path}: exists; --filter writes a new file and never overwrites one"
                ) from None
    finally:
        if fh is not None:
            fh.close()
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return texts


def _document(
    result: AuditResult,
    source: str | Path,
    pol: AuditPolicy,
    stats: ReadStats,
    dets: list[Detector],
    where: Callable[[int], str],
) -> dict[str, Any]:
    from tunesec import __version__

    return {
        "tool": {"name": "tunesec", "version": __version__},
        "source": str(source),
        "format": stats.format,
        "schema": stats.schema,
        "rows": result.rows,
        "skipped": {"count": stats.skipped, "where": stats.skipped_where},
        "policy": pol.model_dump(mode="json"),
        "decision": "findings" if result.exit_code else "clean",
        "exit_code": result.exit_code,
        "detectors": result.detectors,
        "trigger_candidates": result.trigger_candidates,
        "filtered": result.filtered,
        "seconds": result.seconds,
        "findings": [
            {**f.to_json(), "where": [where(i) for i in f.rows[:50]]}
            for f in sorted(result.findings, key=lambda f: (f.rows[0] if f.rows else -1, f.detector))
        ],
    }
