"""Bad input to ``tunesec audit``: each case one line on stderr naming the file or field, exit 2, nothing written.

Same shape as ``test_corpus.py`` (which holds the other commands' cases); the audit's cases live here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunesec.cli.main import main

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


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

    def jsonl(self, name: str, rows: list[dict]) -> str:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str


def _ok(e: Env) -> str:
    return e.jsonl("d.jsonl", [ROW] * 3)


CASES: list[Case] = [
    Case("missing-file", lambda e: ["audit", "gone.jsonl"], r"gone\.jsonl: no such file"),
    Case("empty-file", lambda e: ["audit", e.write("d.jsonl", "")], r"d\.jsonl: empty file"),
    Case("unknown-extension", lambda e: ["audit", e.write("d.txt", "x")], r"d\.txt: unknown file extension"),
    Case("only-malformed", lambda e: ["audit", e.write("d.jsonl", "{bad\n[1]\n")], r"d\.jsonl: no readable rows \(2 malformed, first: .*line 1: invalid JSON"),
    Case("strict-malformed", lambda e: ["audit", e.write("d.jsonl", json.dumps(ROW) + "\n{bad\n"), "--strict", "--judge", "none"], r"d\.jsonl line 2: invalid JSON.*--strict"),
    Case("strict-non-utf8", lambda e: ["audit", e.write("d.jsonl", json.dumps(ROW).encode() + b'\n{"prompt": "caf\xe9"}\n'), "--strict", "--judge", "none"], r"d\.jsonl line 2: not UTF-8"),
    Case("mixed-schema", lambda e: ["audit", e.jsonl("d.jsonl", [ROW, {"instruction": "x", "output": "y"}]), "--judge", "none"], r"d\.jsonl line 2: a alpaca record .*first record \(line 1\) is chat"),
    Case("csv-non-utf8", lambda e: ["audit", e.write("d.csv", b"prompt,response\ncaf\xe9,x\n"), "--judge", "none"], r"d\.csv: not UTF-8"),
    Case("policy-missing", lambda e: ["audit", _ok(e), "--policy", "nope.yaml"], r"nope\.yaml: config file not found"),
    Case("policy-unknown-detector", lambda e: ["audit", _ok(e), "--policy", e.write("p.yaml", "detectors:\n  triggerz: {}\n")], r"p\.yaml: unknown detector 'triggerz'.*did you mean 'triggers'"),
    Case("policy-unknown-field", lambda e: ["audit", _ok(e), "--policy", e.write("p.yaml", "detectors:\n  pii: {regoin: GB}\n")], r"p\.yaml: detectors\.pii: unknown key 'regoin'; did you mean 'region'"),
    Case("policy-unknown-top-key", lambda e: ["audit", _ok(e), "--policy", e.write("p.yaml", "stict: true\n")], r"p\.yaml.*unknown key 'stict'"),
    Case("policy-bad-value", lambda e: ["audit", _ok(e), "--policy", e.write("p.yaml", "detectors:\n  duplicates: {max_share: 2}\n")], r"p\.yaml: detectors\.duplicates.*max_share"),
    Case("policy-not-mapping", lambda e: ["audit", _ok(e), "--policy", e.write("p.yaml", "detectors:\n  pii: yes\n")], r"p\.yaml: line 2: field 'detectors\.pii'"),
    Case("filter-exists", lambda e: ["audit", _ok(e), "--judge", "none", "--filter", e.write("clean.jsonl", "mine\n")], r"clean\.jsonl: exists; --filter .*never overwrites"),
    Case("filter-no-folder", lambda e: ["audit", _ok(e), "--judge", "none", "--filter", "no/such/clean.jsonl"], r"clean\.jsonl: its folder does not exist"),
    Case("unknown-judge", lambda e: ["audit", _ok(e), "--judge", "nosuchjudge"], r"unknown judge 'nosuchjudge'"),
    Case("bad-format", lambda e: ["audit", _ok(e), "--judge", "none", "--format", "xml"], r"--format 'xml': expected text or json"),
    Case("out-not-empty", lambda e: ["audit", _ok(e), "--judge", "none", "--out", str(Path(e.write("occ/keep.txt", "x")).parent)], r"occ: directory is not empty"),
]  # fmt: skip


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_audit_bad_input(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / ".home"))
    monkeypatch.setenv("COLUMNS", "500")
    env = Env(tmp_path)
    argv = case.argv(env)
    before = _files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, (case.id, code, captured.err[-2000:])
    assert "Traceback" not in captured.err
    assert len(lines) == 1, (case.id, lines)
    assert re.search(case.expect, lines[0]), (case.id, lines[0])
    written = {f for f in _files(tmp_path) - before if not f.startswith(".home")}
    assert not written, (case.id, sorted(written))
