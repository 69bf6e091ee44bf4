"""Bad input to ``tunesec scan``: each case one line on stderr naming the path or option, exit 2, nothing written.

Same shape as ``test_corpus.py``; the scan's cases live here. A bad artifact (a pickle payload, a truncated
safetensors) is not bad input: it is a finding (exit 1), tested in ``tests/test_scan_corpus.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunesec.cli.main import main


@dataclass
class Env:
    tmp: Path

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def folder(self, name: str, files: dict[str, str] | None = None) -> str:
        (self.tmp / name).mkdir()
        for f, text in (files or {}).items():
            self.write(f"{name}/{f}", text)
        return str(self.tmp / name)


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str


def _unreadable(e: Env) -> str:
    path = e.write("w.safetensors", b"\x00" * 16)
    os.chmod(path, 0)
    return path


CASES: list[Case] = [
    Case("missing-path", lambda e: ["scan", "gone.safetensors"], r"gone\.safetensors: not found; expected a model or adapter directory"),
    Case("missing-dir", lambda e: ["scan", "no-such-model/"], r"no-such-model: not found"),
    Case("empty-dir", lambda e: ["scan", e.folder("empty")], r"empty: nothing to scan \(no \*\.safetensors"),
    Case("dir-of-text", lambda e: ["scan", e.folder("docs", {"README.md": "# hi\n", "notes.txt": "x"})], r"docs: nothing to scan"),
    Case("unknown-format", lambda e: ["scan", e.write("notes.txt", "hello")], r"notes\.txt: unknown format; expected a \.gguf, \.safetensors or pickle"),
    Case("bin-not-pickle", lambda e: ["scan", e.write("blob.bin", b"\x01\x02not a pickle")], r"blob\.bin: unknown format"),
    Case("readme-alone", lambda e: ["scan", e.write("README.md", "# card\n")], r"README\.md: unknown format"),
    Case("bad-format-option", lambda e: ["scan", e.write("m.pkl", b"\x80\x04N."), "--format", "xml"], r"--format 'xml': expected text or json"),
    Case("out-not-empty", lambda e: ["scan", e.write("m.pkl", b"\x80\x04N."), "--out", e.folder("full", {"mine.txt": "x"})], r"full: directory is not empty; choose a new --out"),
    Case("base-missing", lambda e: ["scan", e.write("m.pkl", b"\x80\x04N."), "--base", "./no-base-here"], r"no-base-here.*not found"),
    Case("base-unknown-alias", lambda e: ["scan", e.write("m.pkl", b"\x80\x04N."), "--base", "nosuchmodel"], r"nosuchmodel"),
]  # fmt: skip


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / ".home"))
    monkeypatch.setenv("COLUMNS", "500")
    argv = case.argv(Env(tmp_path))
    before = _files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, (case.id, code, captured.err[-2000:])
    assert "Traceback" not in captured.err
    assert len(lines) == 1, (case.id, lines)
    assert re.search(case.expect, lines[0]), (case.id, lines[0])
    assert {f for f in _files(tmp_path) - before if not f.startswith(".home")} == set(), case.id


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads files whatever their mode (tests/test_scan_cli.py simulates it)"
)
def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    path = _unreadable(Env(tmp_path))
    assert main(["scan", path]) == 2
    assert re.search(r"w\.safetensors: cannot read \(Permission denied\)", capsys.readouterr().err)
