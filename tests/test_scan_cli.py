"""``tunesec scan`` on the command line: exit codes, scan.json and report.html, escaping, never overwriting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import scan_corpus as sc
from tunesec.cli.main import main


def test_clean_file_exits_0_and_writes_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sc.good_safetensors(tmp_path / "w.safetensors")
    out = tmp_path / "run"
    assert main(["scan", str(path), "--out", str(out)]) == 0
    doc = json.loads((out / "scan.json").read_text())
    assert doc["decision"] == "clean" and doc["exit_code"] == 0
    assert doc["files"]["w.safetensors"]["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert (out / "report.html").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "CLEAN" in capsys.readouterr().out


def test_findings_exit_1_and_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sc.payload_pickle(tmp_path / "m.pkl", os.system, "id")
    assert main(["scan", str(path), "--out", str(tmp_path / "run"), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"] == "findings" and doc["counts"]["critical"] >= 1
    assert doc["findings"][0]["severity"] == "critical"


def test_report_escapes_artifact_text(tmp_path: Path) -> None:
    from tiny import CHATML

    path = sc.gguf_with_template(tmp_path, "x", sc.injected_templates(CHATML)["script-in-template"])
    out = tmp_path / "run"
    assert main(["scan", str(path), "--out", str(out)]) == 1
    html = (out / "report.html").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_never_overwrites_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sc.good_safetensors(tmp_path / "w.safetensors")
    out = tmp_path / "run"
    assert main(["scan", str(path), "--out", str(out)]) == 0
    before = (out / "scan.json").read_bytes()
    capsys.readouterr()
    assert main(["scan", str(path), "--out", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert (out / "scan.json").read_bytes() == before


def test_default_run_directory_is_new_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = sc.good_safetensors(tmp_path / "w.safetensors")
    assert main(["scan", str(path)]) == 0
    assert main(["scan", str(path)]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_unreadable_file_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Root reads any file, so the permission error is simulated at the one place files are first opened."""
    import tunesec.scan.runner as runner

    path = sc.good_safetensors(tmp_path / "w.safetensors")
    real_open = open

    def deny(file, *args, **kwargs):
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(runner, "open", deny, raising=False)
    assert main(["scan", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w.safetensors: cannot read (Permission denied)" in err[0]
