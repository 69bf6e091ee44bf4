"""The command line: fast help, one-line errors with exit code 2, generate end to end on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesec.cli.main import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunesec.cli.main", *args], capture_output=True, text=True, timeout=300
    )


def test_help_does_not_import_torch() -> None:
    code = "import sys; from tunesec.cli.main import app, main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert "generate" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "nosuchmodel", "--prompt", "hi"], "unknown model 'nosuchmodel'"),
        (["generate", "./missing-dir", "--prompt", "hi"], "model directory not found"),
        (["list", "wizards"], "unknown kind 'wizards'"),
        (["generate", "smollm2-135m"], "give --prompt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    out = _run(*args)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback() -> None:
    out = _run("--debug", "generate", "nosuchmodel", "--prompt", "hi")
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_generate_writes_jsonl_and_never_overwrites(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "The quick fox"}]}\n')
    out = tmp_path / "out.jsonl"
    assert (
        main(["generate", str(tiny_llama_dir), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "5"]) == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["completion_tokens"] <= 5 for r in rows)
    before = out.read_text()
    assert main(["generate", str(tiny_llama_dir), "--prompt", "x", "--out", str(out)]) == 2
    assert out.read_text() == before


def test_bad_prompts_file_names_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    out = _run("generate", str(tiny_llama_dir), "--file", str(bad))
    assert out.returncode == 2 and "bad.jsonl line 2: invalid JSON" in out.stderr


def test_list_models() -> None:
    out = _run("list", "models")
    assert out.returncode == 0 and "smollm2-135m" in out.stdout


def test_models_info_reports_architecture_and_hashes(tiny_llama_dir: Path, capsys) -> None:
    assert main(["models", "info", str(tiny_llama_dir), "--hashes"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "llama" and info["layers"] == 2
    assert info["chat_template"] == "model's own"
    assert len(info["weights_sha256"]) == 64
