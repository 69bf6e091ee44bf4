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


def _command_paths() -> list[list[str]]:
    """Every command of the typer app (walked, so that commands added later are covered too)."""
    import typer

    from tunesec.cli.main import app

    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append(path)

    walk(root, [])
    return out


def test_every_command_rejects_an_unknown_option_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tunesec.cli.main import main

    paths = _command_paths()
    assert ["judge"] in paths and ["eval"] in paths and ["models", "list"] in paths
    for path in paths:
        code = main([*path, "--no-such-option-xyz"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, path
        assert len(lines) == 1 and "Traceback" not in captured.err, (path, captured.err)
        assert "--no-such-option-xyz" in lines[0], (path, lines[0])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["evl"], "No such command 'evl'. Did you mean 'eval'?"),
        (["eval", "x", "--limit", "0"], "'--limit'"),
        (["eval"], "Missing argument 'model'"),
        (["generate", "x", "--sample", "maybe"], "unexpected extra argument"),
    ],
)
def test_parser_errors_are_one_line_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tunesec.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err


def test_bare_command_shows_help(capsys: pytest.CaptureFixture[str]) -> None:
    from tunesec.cli.main import main

    assert main([]) == 0
    out = capsys.readouterr()
    assert "Usage" in out.out and "Traceback" not in out.err


def test_unknown_task_option_names_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from tunesec.cli.main import main

    assert main(["eval", "smollm2-135m", "--task-option", "bogus=1", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("task harmfulness: unknown option 'bogus'; expected one of: prefill") and "TypeError" not in err


def test_models_list_has_a_cached_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunesec.cli.main import main

    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "cached" in out
    row = next(line for line in out.splitlines() if "smollm2-135m " in line or "│ smollm2-135m " in line)
    assert "no" in row.split("│")[-2]


def test_third_party_progress_bars_are_off_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from tunesec.cli.main import main

    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    main(["--debug", "list", "judges"])
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    main(["list", "judges"])
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def test_generate_reads_csv_prompts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,other\nhello there,1\nThe quick fox,2\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(tiny_llama_dir), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 2
    bad = tmp_path / "q.csv"
    bad.write_text("question\nhi\n")
    r = _run("generate", str(tiny_llama_dir), "--file", str(bad))
    assert r.returncode == 2 and "q.csv line 2: expected a 'prompt'" in r.stderr


def test_runs_lists_what_each_run_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "r1"
    run.mkdir()
    spec = {
        "task": {"name": "harmfulness", "prefill": "target"},
        "dataset": {"name": "advbench", "options": {}},
        "model": {"ref": {"base": "smollm2-135m-aligned", "kind": "alias"}},
    }
    (run / "run.json").write_text(json.dumps({"kind": "eval", "status": "finished", "spec": spec}))
    metric = {"name": "harmful_rate", "value": 0.3, "ci_low": 0.22, "ci_high": 0.4}
    (run / "metrics.json").write_text(json.dumps({"metrics": {"harmful_rate": metric}}))
    (tmp_path / "not-a-run").mkdir()
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "harmfulness advbench prefill=target on smollm2-135m-aligned" in out
    assert "harmful_rate 0.300 [0.220, 0.400]" in out and "not-a-run" not in out


def test_help_texts_keep_their_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich markup once ate '[default: ...]' from help texts, leaving a dangling ' .'."""
    monkeypatch.setenv("COLUMNS", "250")
    for path in _command_paths():
        assert main([*path, "--help"]) == 0
        import re

        dangling = [ln for ln in capsys.readouterr().out.splitlines() if re.search(r" \.\s*(│|$)", ln)]
        assert not dangling, (path, dangling)


def test_list_offers_only_kinds_with_components(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "guards"]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'guards'" in err and "judges" in err and "guards" not in err.split("expected")[1]
    assert main(["list", "judges"]) == 0
    assert "response-judge" in capsys.readouterr().out


def test_list_datasets_shows_subsets_and_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNESEC_DATA", str(tmp_path))  # an empty data directory: only the package's sets load
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["list", "datasets"]) == 0
    rows = {ln.split("│")[1].strip(): ln for ln in capsys.readouterr().out.splitlines() if ln.count("│") > 5}
    assert "│ yes " in rows["advbench"] and "│ 520 " in rows["advbench"]  # shipped in the package
    assert "│ no " in rows["harmbench"]
    assert "safe, unsafe, all" in rows["xstest"]


def test_peft_hub_lookup_warnings_are_silenced_unless_debug() -> None:
    import warnings

    from tunesec.cli.main import main

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main(["list", "judges"])
        warnings.warn("Unable to fetch remote file due to the following error x", UserWarning, stacklevel=1)
        warnings.warn("Could not find a config file in smollm2-135m", UserWarning, stacklevel=1)
    assert not [w for w in seen if "remote file" in str(w.message) or "config file in" in str(w.message)]


def test_a_bug_is_one_line_exit_1_and_a_traceback_with_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tunesec.cli.common as common

    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(common.console, "print", boom)
    assert main(["list", "judges"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error: ZeroDivisionError: division by zero" in err
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "list", "judges"])
