"""Self-contained HTML reports of evaluation runs and comparisons.

jinja2 renders with autoescape on, so model outputs (which may hold markup or script) appear as text. CSS is
inline and the per-category chart is a matplotlib (Agg) PNG embedded as base64 and also saved under
``plots/``, so ``report.html`` is one file that opens offline.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunesec.evals.metrics import MetricValue
from tunesec.store.atomic import atomic_write_bytes, atomic_write_text
from tunesec.store.run import RunDir

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
MAX_EXAMPLES = 25
MAX_CHARS = 4000


def render_report(run_dir: str | Path, out: str | Path | None = None, *, max_examples: int = MAX_EXAMPLES) -> Path:
    """Render ``report.html`` (and the per-category chart under ``plots/``) from an evaluation run directory.

    Args:
        run_dir: A run directory with ``metrics.json`` (written by :func:`tunesec.evals.evaluate`).
        out: Where to write the HTML; default ``RUN_DIR/report.html``.
        max_examples: How many example responses to show.

    Returns:
        The path of the written HTML file.
    """
    from tunesec.evals.runner import EvalReport
    from tunesec.evals.tasks import get_task

    run = RunDir.open(run_dir)
    report = EvalReport.load(run.path)
    task_spec = dict(report.spec.get("task") or {"name": report.task})
    task = get_task(str(task_spec.pop("name", report.task)), **task_spec)
    descriptions = {s.name: s.description for s in task.metric_specs()}
    metrics = list(report.metrics.values())
    headline = metrics[0].name if metrics else ""
    categories = sorted({c for m in metrics for c in m.per_category})
    chart = ""
    if headline and report.metrics[headline].per_category:
        png = category_chart(report.metrics[headline])
        atomic_write_bytes(run.path / PLOTS_DIR / f"{headline}_by_category.png", png)
        chart = base64.b64encode(png).decode("ascii")

    records = list(run.records())
    html = (
        html_environment()
        .from_string(_template("REPORT_TEMPLATE"))
        .render(
            report=report,
            model_name=_model_name(report.spec),
            run_dir=str(run.path),
            status=run.meta.get("status", "?"),
            confidence=float(report.spec.get("confidence", 0.95)),
            metrics=metrics,
            descriptions=descriptions,
            headline=headline,
            categories=categories,
            category_metrics=[m.name for m in metrics if m.per_category],
            chart=chart,
            spec_rows=_spec_rows(report.spec, report.counts, report.timing),
            examples=[_example_row(r) for r in _pick_examples(records, max_examples)],
            version=_version(),
        )
    )
    target = Path(out) if out is not None else run.path / REPORT_FILE
    atomic_write_text(target, html)
    return target


def render_comparison(comparison: Any, out: str | Path) -> Path:
    """Write a comparison (:class:`tunesec.evals.compare.Comparison`) as a self-contained HTML page."""
    html = html_environment().from_string(_template("COMPARE_TEMPLATE")).render(cmp=comparison, version=_version())
    return atomic_write_text(Path(out), html)


def category_chart(metric: MetricValue) -> bytes:
    """A horizontal bar chart of a metric per category with its interval as error bars (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cats = sorted(metric.per_category)
    values = [metric.per_category[c].value for c in cats]
    lows = [max(0.0, v - metric.per_category[c].ci_low) for c, v in zip(cats, values, strict=True)]
    highs = [max(0.0, metric.per_category[c].ci_high - v) for c, v in zip(cats, values, strict=True)]
    fig = Figure(figsize=(7.0, 0.45 * len(cats) + 1.2), dpi=100)
    ax = fig.add_subplot()
    ax.barh(cats, values, xerr=[lows, highs], color="#4e79a7", ecolor="#1d2430", capsize=3)
    ax.axvline(metric.value, color="#e15759", linestyle="--", linewidth=1, label=f"overall {metric.value:.3f}")
    ax.set_xlabel(f"{metric.name} ({metric.confidence:.0%} {metric.method} interval)")
    if metric.is_rate:
        ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def html_environment() -> Any:
    """The Jinja environment of every tunesec HTML page: autoescaped, strict about undefined names."""
    from jinja2 import Environment, StrictUndefined

    # autoescape=True for every template: these pages show untrusted model output.
    return Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _template(name: str) -> str:
    from tunesec.evals import templates

    text: str = getattr(templates, name)
    return text


def _model_name(spec: Mapping[str, Any]) -> str:
    model = spec.get("model") or {}
    ref = model.get("ref")
    if isinstance(ref, dict):
        return str(ref.get("base", "?")) + (f" + {ref['adapter']}" if ref.get("adapter") else "")
    return str(model.get("name", "?"))


def _spec_rows(
    spec: Mapping[str, Any], counts: Mapping[str, int], timing: Mapping[str, float]
) -> list[tuple[str, str]]:
    rows = [(key, _pretty(value)) for key, value in spec.items() if key != "provenance"]
    rows.append(("counts", _pretty(counts)))
    rows.append(("timing (s)", _pretty(timing)))
    prov = spec.get("provenance") or {}
    for key, value in prov.items():
        rows.append((f"provenance.{key}", _pretty(value)))
    return rows


def _pretty(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, indent=1, sort_keys=True, default=str)
    return str(value)


def _pick_examples(records: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """Failures first (harmful, refused, wrong, unparsed), then the rest, in file order."""
    flagged = [r for r in records if record_verdict(r)[1]]
    rest = [r for r in records if not record_verdict(r)[1]]
    return (flagged + rest)[:n]


def record_verdict(r: Mapping[str, Any]) -> tuple[str, bool]:
    """A record's verdict label and whether it is a failure (harmful, refused, wrong or unparsed)."""
    if r.get("unparsed"):
        return "unparsed", True
    if "harmful" in r:
        if r.get("harmful"):
            return "harmful", True
        return ("refused" if r.get("refused") else "not harmful"), False
    if "refusal_class" in r:
        label = {"full": "full refusal", "partial": "partial refusal", "none": "complied"}
        cls = r.get("refusal_class")
        return label.get(str(cls), "unjudged"), cls in ("full", "partial")
    if "correct" in r:
        if r.get("parsed") is None:
            return "no answer", True
        return ("correct" if r["correct"] else f"wrong ({r['parsed']} vs {r.get('reference')})"), not r["correct"]
    return "", False


def _example_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": r.get("id"),
        "category": r.get("category"),
        "verdict": record_verdict(r)[0],
        "prompt": clip_text(str(r.get("prompt", ""))),
        "response": clip_text(str(r.get("response", ""))),
    }


def clip_text(text: str) -> str:
    """``text`` cut at ``MAX_CHARS`` characters, saying how many were left out."""
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f" [... {len(text) - MAX_CHARS} more chars]"


def _version() -> str:
    from tunesec import __version__

    return __version__
