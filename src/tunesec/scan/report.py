"""``report.html`` of a scan: the decision, the findings by severity, the files with their sha256, provenance.

Rendered with tunesec's autoescaping Jinja environment (:func:`tunesec.evals.report.html_environment`): file
names, tensor names, templates and reasons come from an untrusted artifact, so markup in them shows as text.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesec.store.atomic import atomic_write_text

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunesec scan: {{ doc.path }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#1d2430}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#eef}.fail{color:#b00;font-weight:bold}.ok{color:#070}
.critical,.high{color:#b00;font-weight:bold}.medium{color:#b60}.low{color:#555}.info{color:#678}
pre{white-space:pre-wrap;background:#f6f6f9;padding:6px;margin:2px 0;max-height:14em;overflow:auto}
code{word-break:break-all}
</style></head><body>
<h1>Scan of {{ doc.path }}</h1>
<p class="{{ 'fail' if doc.exit_code else 'ok' }}">{{ 'FINDINGS' if doc.exit_code else 'CLEAN' }}: {{ doc.kind }},
{{ doc.files | length }} files{% if doc.base %}, base {{ doc.base }}{% endif %}, {{ doc.seconds }} s.
{% for s in ['critical', 'high', 'medium', 'low', 'info'] if doc.counts.get(s) %}{{ doc.counts[s] }} {{ s }}
{{- ', ' if not loop.last }}{% endfor %}</p>
<p>Nothing was loaded: pickles were decompiled, not unpickled; templates rendered in the sandbox.</p>
<h2>Findings</h2>
{% if findings %}
<table><tr><th>severity</th><th>check</th><th>file</th><th>reason</th></tr>
{% for f in findings %}
<tr><td class="{{ f.severity }}">{{ f.severity }}</td><td>{{ f.check }}</td><td><code>{{ f.file }}</code></td>
<td>{{ f.reason }}{% if f.detail.get('rendered') %}<details><summary>rendered probe</summary>
<pre>{{ f.detail.rendered }}</pre>{% if f.detail.get('base_rendered') %}<p>base:</p>
<pre>{{ f.detail.base_rendered }}</pre>{% endif %}</details>{% endif %}</td></tr>
{% endfor %}</table>
{% else %}<p>No findings.</p>{% endif %}
<h2>Notes</h2>
<ul>{% for f in notes %}<li>{{ f.check }} <code>{{ f.file }}</code>: {{ f.reason }}</li>{% endfor %}</ul>
{% if forensics and forensics.get('layers') %}
<h2>Weight forensics against the base</h2>
<p>Total drift {{ '%.4g' % forensics.total_drift }}; random alignment {{ '%.3f' % forensics.random_cos }}.</p>
<table><tr><th>layer</th><th>drift</th><th>attention</th><th>MLP</th><th>cos(update, refusal dir)</th>
<th>gain</th></tr>
{% for x in forensics.layers %}<tr><td>{{ x.layer }}</td><td>{{ '%.4g' % x.drift }}</td>
<td>{{ '%.4g' % x.attn_drift }}</td>
<td>{{ '%.4g' % x.mlp_drift }}</td><td>{{ '%.3f' % x.refusal_cos if x.refusal_cos is not none else '' }}</td>
<td>{{ '%.3f' % x.refusal_gain if x.refusal_gain is not none else '' }}</td></tr>{% endfor %}</table>
{% endif %}
<h2>Provenance</h2>
{% for name, fields in doc.provenance.items() %}<h3><code>{{ name }}</code></h3>
<table>{% for k, v in fields.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>{% endfor %}
<h2>Files</h2>
<table><tr><th>file</th><th>bytes</th><th>sha256</th></tr>
{% for name, f in doc.files.items() %}<tr><td><code>{{ name }}</code></td><td>{{ f.bytes }}</td>
<td><code>{{ f.sha256 }}</code></td></tr>{% endfor %}
</table>
<p>tunesec {{ doc.tool.version }}. Every finding is in scan.json.</p>
</body></html>
"""


def render_scan_report(run_dir: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``report.html`` into ``run_dir`` from the ``scan.json`` document."""
    from tunesec.evals.report import html_environment

    findings = [f for f in doc["findings"] if f["severity"] != "info"]
    notes = [f for f in doc["findings"] if f["severity"] == "info"]
    html = (
        html_environment()
        .from_string(TEMPLATE)
        .render(doc=doc, findings=findings, notes=notes, forensics=doc.get("forensics"))
    )
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, html)
    return out
