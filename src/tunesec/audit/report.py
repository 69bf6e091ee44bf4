"""``report.html`` of an audit: the decision, a summary per detector, the candidate triggers, example rows.

Rendered with tunesec's autoescaping Jinja environment (the rows are untrusted text: markup in them shows as
text); the plot of flagged rows by detector is a matplotlib (Agg) PNG saved under ``plots/`` and embedded as
base64, so the page is one file that opens offline.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesec.store.atomic import atomic_write_bytes, atomic_write_text

PLOT = "plots/findings_by_detector.png"
MAX_CHARS = 1500

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunesec audit: {{ doc.source }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#1d2430}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#eef}.fail{color:#b00;font-weight:bold}.ok{color:#070}
pre{white-space:pre-wrap;background:#f6f6f9;padding:6px;margin:2px 0;max-height:18em;overflow:auto}
</style></head><body>
<h1>Audit of {{ doc.source }}</h1>
<p class="{{ 'fail' if doc.exit_code else 'ok' }}">{{ 'FINDINGS above the policy' if doc.exit_code else 'CLEAN' }}:
{{ doc.rows }} rows ({{ doc.format }}, {{ doc.schema }}), {{ doc.skipped.count }} malformed rows skipped,
policy {{ doc.policy.name }}, {{ doc.seconds }} s.</p>
{% if doc.filtered %}<p>--filter: {{ doc.filtered.kept }} rows kept in {{ doc.filtered.path }},
{{ doc.filtered.removed }} removed (removed.jsonl).</p>{% endif %}
<h2>Detectors</h2>
<table><tr><th>detector</th><th>findings</th><th>flagged rows</th><th>share</th><th>policy max</th><th>status</th></tr>
{% for name, d in doc.detectors.items() %}
<tr><td>{{ name }}</td><td>{{ d.findings }}</td><td>{{ d.flagged_rows }}</td><td>{{ '%.2f%%' % (100 * d.share) }}</td>
<td>{{ '%.2f%%' % (100 * d.max_share) }}</td><td class="{{ 'fail' if d.failed else 'ok' }}">{{ 'fail' if d.failed
else 'pass' }}</td></tr>
{% endfor %}</table>
{% if chart %}<img alt="flagged rows by detector" src="data:image/png;base64,{{ chart }}">{% endif %}
<h2>Candidate triggers</h2>
{% if doc.trigger_candidates %}
<table><tr><th>rank</th><th>candidate</th><th>rows</th><th>compliant/harmful</th><th>refused</th><th>placement</th>
<th>test</th><th>p</th><th>Holm p</th><th>flagged</th></tr>
{% for c in doc.trigger_candidates %}
<tr><td>{{ c.rank }}</td><td><code>{{ c.text }}</code></td><td>{{ c.rows }}</td><td>{{ c.bad }}</td>
<td>{{ c.refused }}</td><td>{{ c.placement }}</td><td>{{ c.test }}</td><td>{{ '%.2g' % c.p_value }}</td>
<td>{{ '%.2g' % c.p_adjusted }}</td>
<td class="{{ 'fail' if c.flagged else '' }}">{{ 'yes' if c.flagged else 'no' }}</td></tr>
{% endfor %}</table>
{% else %}<p>No candidate was tested (too few compliant or refused rows, or the detector was off).</p>{% endif %}
<h2>Findings (examples)</h2>
{% for name, items in examples.items() %}
<h3>{{ name }}</h3>
{% for f in items %}
<div><p><b>rows {{ f.rows_shown }}</b> score {{ '%.2f' % f.score }}: {{ f.reason }}</p>
{% for ex in f.texts %}{% for role, text in ex.items() if text %}<pre>[{{ role }}] {{ text }}</pre>{% endfor %}
{% endfor %}
</div>
{% endfor %}
{% endfor %}
<p>tunesec {{ doc.tool.version }}. Every finding is in audit.json.</p>
</body></html>
"""


def findings_chart(detectors: Mapping[str, Mapping[str, Any]]) -> bytes:
    """A horizontal bar chart of flagged rows per detector (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(detectors)
    values = [int(detectors[n]["flagged_rows"]) for n in names]
    colours = ["#e15759" if detectors[n]["failed"] else "#4e79a7" for n in names]
    fig = Figure(figsize=(7.0, 0.4 * len(names) + 1.2), dpi=100)
    ax = fig.add_subplot()
    ax.barh(names, values, color=colours)
    ax.set_xlabel("flagged rows (red: above the policy's max share)")
    ax.invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_audit_report(run_dir: str | Path, doc: Mapping[str, Any], texts: Mapping[int, Mapping[str, str]]) -> Path:
    """Write ``report.html`` and the plot into ``run_dir`` from the audit document and example rows' texts."""
    from tunesec.evals.report import html_environment

    path = Path(run_dir)
    chart = ""
    if doc["detectors"]:
        png = findings_chart(doc["detectors"])
        atomic_write_bytes(path / PLOT, png)
        chart = base64.b64encode(png).decode("ascii")
    k = int(doc["policy"].get("max_examples", 5))
    examples: dict[str, list[dict[str, Any]]] = {}
    for f in doc["findings"]:
        items = examples.setdefault(f["detector"], [])
        if len(items) >= k:
            continue
        shown = [i for i in f["rows"] if i in texts][:2]
        clipped = [{r: _clip(t) for r, t in texts[i].items()} for i in shown]
        rows = ", ".join(map(str, f["rows"][:10])) + (" ..." if len(f["rows"]) > 10 else "")
        items.append({"rows_shown": rows, "score": f["score"], "reason": f["reason"], "texts": clipped})
    html = html_environment().from_string(TEMPLATE).render(doc=doc, chart=chart, examples=examples)
    out = path / "report.html"
    atomic_write_text(out, html)
    return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f" ... [{len(text) - MAX_CHARS} more characters]"
