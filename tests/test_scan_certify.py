"""The artifact scan in ``certify``'s certificate when the tuned model is a local artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import scan_corpus as sc
from certify_fakes import ScriptedGenerator, refuses_all
from tunesec.certify import certify

POLICY = """
name: scan-policy
max_new_tokens: 4
checks:
  - name: refusal-on-harmful
    task: harmfulness
    dataset: tunesec-harmful
    judge: test-marker
    limit: 4
    metric: refusal_rate
    measure: tuned
    min: 0.0
triggers:
  enabled: false
forensics:
  enabled: false
"""


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / "home"))
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


def _certify(base: Path, tuned: Path, policy: Path, out: Path) -> dict:
    certify(
        str(base), str(tuned), policy=policy, out=out, progress=False,
        base_generator=ScriptedGenerator(refuses_all), tuned_generator=ScriptedGenerator(refuses_all),
    )  # fmt: skip
    return json.loads((out / "certificate.json").read_text())


def test_certificate_records_the_scan_of_a_local_tuned_model(tmp_path: Path, policy: Path) -> None:
    from tiny import save_tiny

    base = save_tiny(tmp_path / "base", seed=0)
    tuned = save_tiny(tmp_path / "tuned", seed=1)
    cert = _certify(base, tuned, policy, tmp_path / "clean")
    scan = cert["artifact_scan"]
    assert scan["decision"] == "clean" and scan["findings"] == []
    assert scan["path"] == str(tuned) and "model.safetensors" in scan["files"]

    sc.payload_pickle(tuned / "training_args.bin", os.system, "id", protocol=2)
    cert = _certify(base, tuned, policy, tmp_path / "payload")
    scan = cert["artifact_scan"]
    assert scan["decision"] == "findings"
    assert any(f["severity"] == "critical" and f["file"] == "training_args.bin" for f in scan["findings"])


def test_certificate_report_shows_the_scan_escaped(tmp_path: Path, policy: Path) -> None:
    from tiny import save_tiny

    base = save_tiny(tmp_path / "base", seed=0)
    tuned = save_tiny(tmp_path / "tuned", seed=1)
    sc.payload_pickle(tuned / "<img src=x onerror=alert(1)>.pkl", os.system, "id", protocol=2)
    cert = _certify(base, tuned, policy, tmp_path / "run")
    assert cert["artifact_scan"]["decision"] == "findings"
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="artifact-scan"' in html and "never load this file" in html
    assert "&lt;img src=x onerror=alert(1)&gt;.pkl" in html and "<img src=x" not in html
