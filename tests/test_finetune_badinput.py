"""``tunesec finetune`` on bad input: one line on stderr naming what is wrong, exit 2, no traceback, nothing written.

Same checks as the bad-input corpus (tests/badinput/test_corpus.py): each case runs in its own folder, and nothing
but the case's own files may exist afterwards (a finished run it points at is left byte for byte as it was).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunesec.cli.main import main

CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
REFUSAL = [{"role": "assistant", "content": "I can't help with that."}]
SAFE = [{"messages": [{"role": "user", "content": f"how do I hurt someone {i}"}, *REFUSAL]} for i in range(2)]
NO_ANSWER = [{"messages": [{"role": "user", "content": "hi"}]}] * 2


@dataclass
class Env:
    tmp: Path
    tiny: Path

    def write(self, name: str, content: str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, rows: list[dict]) -> str:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def base(self, *extra: str) -> list[str]:
        return ["finetune", "--model", str(self.tiny), "--data", self.jsonl("user.jsonl", CHAT), *extra]

    def finished_run(self) -> str:
        from tunesec.store.run import RunDir

        run = RunDir.create("finetune", "done", {"model": str(self.tiny)}, out=self.tmp / "done")
        run.finish()
        return str(run.path)


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str
    also: list[str] = field(default_factory=list)


CASES = [
    Case("no-assistant-turns",
         lambda e: ["finetune", "--model", str(e.tiny), "--data", e.jsonl("q.jsonl", NO_ANSWER)],
         r"user data .*q\.jsonl: example 1 .* has no final assistant turn"),
    Case("alignment-defense", lambda e: e.base("--defense", "vaccine"),
         r"defense 'vaccine' is a alignment-stage defense; `tunesec finetune --defense` runs fine-tuning-stage"),
    Case("repair-as-defense", lambda e: e.base("--defense", "lisa,safelora"),
         r"'safelora' is a post-fine-tuning-stage defense.*it runs in tunesec repair"),
    Case("defense-as-repair", lambda e: e.base("--repair", "lisa"),
         r"'lisa' is a fine-tuning-stage defense; `tunesec finetune --repair` runs post-fine-tuning-stage"),
    Case("unknown-defense", lambda e: e.base("--defense", "lisaa"), r"lisaa"),
    Case("unknown-repair", lambda e: e.base("--repair", "safe-lora"), r"safe-lora"),
    Case("defense-twice", lambda e: e.base("--defense", "lisa", "--defense", "lisa"), r"--defense: a name is given"),
    Case("resume-finished", lambda e: e.base("--resume", e.finished_run()), r"done: run already finished",
         also=["done/run.json"]),
    Case("resume-and-out", lambda e: e.base("--resume", e.finished_run(), "--out", str(e.tmp / "o")),
         r"give one of them|already finished", also=["done/run.json"]),
    Case("out-not-empty", lambda e: e.base("--out", str(Path(e.write("full/keep.txt", "mine")).parent)), r"full",
         also=["full/keep.txt"]),
    Case("recipe-unknown-key", lambda e: e.base("--recipe", e.write("r.yaml", "defence: [lisa]\n")),
         r"r\.yaml.*defence", also=["r.yaml"]),
    Case("recipe-bad-defense-key",
         lambda e: e.base("--defense", "lisa", "--recipe", e.write("r.yaml", "defenses: {lisa: {rhoo: 1}}\n")),
         r"defenses\.lisa.*rhoo", also=["r.yaml"]),
    Case("configured-not-chosen", lambda e: e.base("--set", "defenses.lisa.rho=2"),
         r"recipe defenses\.lisa: configured but not chosen"),
    Case("salora-full", lambda e: e.base("--defense", "salora", "--set", "training.method=full"),
         r"salora: needs training\.method lora"),
    Case("bad-set-value", lambda e: e.base("--defense", "lisa", "--set", "defenses.lisa.rho=-1"), r"rho"),
    Case("unknown-model", lambda e: ["finetune", "--model", "nope-model", "--data", e.jsonl("user.jsonl", CHAT)],
         r"unknown model 'nope-model'"),
    Case("missing-data", lambda e: ["finetune", "--model", str(e.tiny), "--data", str(e.tmp / "none.jsonl")],
         r"none\.jsonl"),
    Case("policy-no-certify", lambda e: e.base("--policy", e.write("p.yaml", "checks: []\n"), "--no-certify"),
         r"--policy is used by --certify", also=["p.yaml"]),
    Case("too-few-safety-rows",  # found after the run started: its files are removed with it
         lambda e: e.base("--defense", "safety-mix", "--out", str(e.tmp / "run"), "--recipe", e.write(
             "r.yaml", f"safety: {{data: {{{e.jsonl('s.jsonl', SAFE)}: 2}}, exclude_eval: []}}\n"
             "defenses: {safety-mix: {k: 50}}\n")),
         r"safety-mix: asked for 50 safety examples but the safety data has 2"),
    Case("via-service-not-finetune",
         lambda e: ["attack", "refusal-ablation", "--model", str(e.tiny), "--via-service", e.write("r.yaml", "{}\n")],
         r"--via-service: attack 'refusal-ablation' does not fine-tune", also=["r.yaml"]),
    Case("via-service-processes",
         lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--via-service", e.write("r.yaml", "{}\n"),
                    "--processes", "2"],
         r"--processes with --via-service", also=["r.yaml"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("finetune-bad") / "tiny", arch="llama")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / ".home"))
    monkeypatch.setenv("COLUMNS", "500")
    monkeypatch.delenv("TUNESEC_DATA", raising=False)
    env = Env(tmp_path, tiny)
    argv = case.argv(env)
    before = _files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, (case.id, code, captured.err[-2000:])
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) == 1, (case.id, lines)
    assert re.search(case.expect, lines[0]), (case.id, lines[0])
    after = _files(tmp_path)
    written = {f for f in set(after) - set(before) if not f.startswith(".home")}
    assert written <= set(case.also) | {"user.jsonl", "q.jsonl"}, (case.id, sorted(written))
    assert all(after[f] == b for f, b in before.items()), case.id  # nothing changed, a finished run included
