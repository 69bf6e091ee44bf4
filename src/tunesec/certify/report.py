"""``report.html`` of a certification: verdict first, then checks, before/after by category, drift, triggers.

Rendered with the evaluation report's jinja2 environment (autoescape on: model outputs, trigger candidates
and prompts appear as text, never markup) and its CSS; charts are matplotlib PNGs embedded as base64, so the
page is one file that opens offline.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from tunesec.certify.certificate import Certificate
from tunesec.evals.metrics import MetricValue
from tunesec.store.atomic import atomic_write_bytes, atomic_write_text
from tunesec.store.run import RunDir

REPORT_FILE = "report.html"
TEMPLATE = "certificate.html.j2"
MAX_EXAMPLES = 8


def render_certificate(
    run_dir: str | Path, certificate: Certificate, *, drift_png: bytes | None = None, out: str | Path | None = None
) -> Path:
    """Write the certification report of ``certificate`` (and its per-category charts under ``plots/``).

    Args:
        run_dir: The certification run directory.
        certificate: The certificate to show.
        drift_png: The drift-by-layer plot (read from ``plots/drift_by_layer.png`` when None).
        out: Target file; default ``RUN_DIR/report.html``.

    Returns:
        The written path.
    """
    from tunesec.evals.report import clip_text, html_environment
    from tunesec.evals.templates import STYLE

    run_path = Path(run_dir)
    if drift_png is None and (run_path / "plots" / "drift_by_layer.png").is_file():
        drift_png = (run_path / "plots" / "drift_by_layer.png").read_bytes()
    evaluations = []
    for i, ev in enumerate(certificate.evaluations):
        view = _evaluation_view(ev)
        if view["chart_png"]:
            atomic_write_bytes(run_path / "plots" / f"before_after_{i}_{ev['task']}.png", view["chart_png"])
        view["chart"] = base64.b64encode(view.pop("chart_png")).decode("ascii") if view["chart_png"] else ""
        evaluations.append(view)
    template = files("tunesec.certify").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    html = (
        html_environment()
        .from_string(template)
        .render(
            cert=certificate,
            confidence=_confidence(certificate),
            evaluations=evaluations,
            forensics=certificate.forensics,
            triggers=certificate.triggers,
            drift_png=base64.b64encode(drift_png).decode("ascii") if drift_png else "",
            base_css=_markup(STYLE),
            fmt=_fmt,
            clip=clip_text,
        )
    )
    target = Path(out) if out is not None else run_path / REPORT_FILE
    atomic_write_text(target, html)
    return target


def _markup(text: str) -> Any:
    from markupsafe import Markup

    # The shared CSS is a constant of tunesec's own source, not data.
    return Markup(text)  # noqa: S704


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _confidence(cert: Certificate) -> float:
    policy = cert.policy.get("policy") or {}
    return float(policy.get("confidence", 0.95))


def _evaluation_view(ev: Mapping[str, Any]) -> dict[str, Any]:
    base = {k: MetricValue.model_validate(v) for k, v in (ev.get("base_metrics") or {}).items()}
    tuned = {k: MetricValue.model_validate(v) for k, v in (ev.get("tuned_metrics") or {}).items()}
    headline = _headline(ev, base)
    rows: list[dict[str, str]] = []
    chart = b""
    if headline and headline in base and headline in tuned:
        mb, mt = base[headline], tuned[headline]
        cats = sorted(set(mb.per_category) | set(mt.per_category))
        for cat in cats:
            cb, ct = mb.per_category.get(cat), mt.per_category.get(cat)
            rows.append(
                {
                    "category": cat,
                    "base": _cell(cb),
                    "tuned": _cell(ct),
                    "change": f"{ct.value - cb.value:+.3f}" if cb and ct else "",
                }
            )
        if cats:
            chart = before_after_chart(mb, mt)
    return {
        **ev,
        "headline": headline,
        "categories": rows,
        "chart_png": chart,
        "examples": _changed_examples(ev),
    }


def _headline(ev: Mapping[str, Any], base: Mapping[str, MetricValue]) -> str:
    from tunesec.evals.tasks import get_task

    try:
        primary = get_task(str(ev["task"])).primary_metric
    except Exception:  # noqa: BLE001 - a report of an unknown task still renders
        primary = ""
    return primary if primary in base else next(iter(base), "")


def _cell(m: MetricValue | None) -> str:
    if m is None:
        return ""
    return f"{m.value:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}] n={m.n}"


def before_after_chart(base: MetricValue, tuned: MetricValue) -> bytes:
    """Grouped horizontal bars per category: base vs tuned, with their intervals (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cats = sorted(set(base.per_category) | set(tuned.per_category))
    fig = Figure(figsize=(8.0, 0.5 * len(cats) + 1.4), dpi=100)
    ax = fig.add_subplot()
    height = 0.38
    series = ((-height / 2, base, "#8a94a6", "base"), (height / 2, tuned, "#e15759", "tuned"))
    for offset, metric, color, label in series:
        vals, lo, hi = [], [], []
        for c in cats:
            m = metric.per_category.get(c)
            v = m.value if m else 0.0
            vals.append(v)
            lo.append(max(0.0, v - m.ci_low) if m else 0.0)
            hi.append(max(0.0, m.ci_high - v) if m else 0.0)
        ys = [i + offset for i in range(len(cats))]
        ax.barh(ys, vals, height=height, xerr=[lo, hi], color=color, ecolor="#1d2430", capsize=2, label=label)
    ax.set_yticks(range(len(cats)), cats)
    ax.invert_yaxis()
    ax.set_xlabel(f"{base.name} ({base.confidence:.0%} {base.method} interval)")
    if base.is_rate:
        ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _changed_examples(ev: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Prompts whose verdict differs between base and tuned (the tuned model's failures first)."""
    from tunesec.evals.report import clip_text, record_verdict

    try:
        base = {str(r["id"]): r for r in RunDir.open(str(ev["base_run"])).records()}
        tuned = list(RunDir.open(str(ev["tuned_run"])).records())
    except Exception:  # noqa: BLE001 - a moved run directory leaves the examples out, not the report
        return []
    rows = []
    for r in tuned:
        b = base.get(str(r.get("id")))
        if b is None:
            continue
        (tv, t_flag), (bv, b_flag) = record_verdict(r), record_verdict(b)
        if tv == bv:
            continue
        rows.append(
            (
                0 if t_flag and not b_flag else 1,
                {
                    "id": r.get("id"),
                    "category": r.get("category"),
                    "prompt": clip_text(str(r.get("prompt", ""))),
                    "base_response": clip_text(str(b.get("response", ""))),
                    "tuned_response": clip_text(str(r.get("response", ""))),
                    "base_verdict": bv,
                    "tuned_verdict": tv,
                },
            )
        )
    rows.sort(key=lambda x: x[0])
    return [row for _, row in rows[:MAX_EXAMPLES]]
