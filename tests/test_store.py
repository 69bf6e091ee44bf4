"""Run directories: spec first, append-only records, atomic writes, resume after a kill, no overwrites."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunesec.errors import RunConflictError, UsageError
from tunesec.store import RunDir, atomic_write_json, sha256_tree
from tunesec.store.atomic import write_new_file


def test_run_json_is_written_first_with_provenance(tmp_path: Path) -> None:
    run = RunDir.create("eval", "demo run", {"model": "m", "seed": 1}, root=tmp_path)
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["status"] == "running" and meta["spec"] == {"model": "m", "seed": 1}
    assert "torch" in meta["provenance"]["versions"]
    assert run.path.name.endswith("-demo-run")
    second = RunDir.create("eval", "demo run", {}, root=tmp_path)
    assert second.path != run.path


def test_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    run = RunDir.create("eval", "x", {}, out=tmp_path / "r")
    run.append({"id": "1"})
    run.finish({"acc": 1.0})
    with pytest.raises(RunConflictError, match="finished run"):
        RunDir.create("eval", "x", {}, out=tmp_path / "r")
    with pytest.raises(RunConflictError, match="already finished"):
        RunDir.resume(tmp_path / "r")
    with pytest.raises(RunConflictError):
        run.append({"id": "2"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunConflictError, match="not empty"):
        RunDir.create("eval", "x", {}, out=tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_unfinished_out_dir_points_to_resume(tmp_path: Path) -> None:
    RunDir.create("eval", "x", {"a": 1}, out=tmp_path / "r")
    with pytest.raises(RunConflictError, match="--resume"):
        RunDir.create("eval", "x", {"a": 1}, out=tmp_path / "r")
    with pytest.raises(UsageError, match="spec differs in a"):
        RunDir.resume(tmp_path / "r", spec={"a": 2})
    with pytest.raises(UsageError, match="cannot resume it as"):
        RunDir.resume(tmp_path / "r", kind="attack")


WRITER = textwrap.dedent(
    """
    import sys, time
    from tunesec.store import RunDir
    run = RunDir.create("eval", "kill", {"n": 1000}, out=sys.argv[1])
    for i in range(1000):
        run.append({"id": str(i), "payload": "x" * 200})
        if i == 20:
            print("ready", flush=True)
        # a torn write, as a kill mid-line leaves
        if i == 40:
            with open(run.records_path, "a") as fh:
                fh.write('{"id": "41", "pay')
                fh.flush()
            time.sleep(60)
    """
)


def test_resume_after_kill_keeps_finished_records(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while time.time() < deadline and b'"pay' not in (out / "records.jsonl").read_bytes()[-20:]:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDir.resume(out, kind="eval", spec={"n": 1000})
    ids = [r["id"] for r in run.records()]
    assert ids == [str(i) for i in range(41)]
    run.append({"id": "41"})
    assert [r["id"] for r in run.records()][-2:] == ["40", "41"]
    assert run.done_ids() == {str(i) for i in range(42)}
    assert len(json.loads((out / "run.json").read_text())["resumed"]) == 1


def test_atomic_writes_and_new_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "m.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileExistsError):
        write_new_file(target, b"no")
    assert json.loads(target.read_text()) == {"x": 2}


def test_tree_hash_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"abc")
    (tmp_path / "notes.txt").write_text("ignored")
    h1 = sha256_tree(tmp_path, suffixes=(".safetensors",))
    (tmp_path / "notes.txt").write_text("changed")
    assert sha256_tree(tmp_path, suffixes=(".safetensors",)) == h1
    (tmp_path / "w.safetensors").write_bytes(b"abd")
    assert sha256_tree(tmp_path, suffixes=(".safetensors",)) != h1


def test_atomic_write_gives_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_json(target, {})
    assert target.stat().st_mode & 0o044 == 0o044  # group/other readable like open() under umask 022


def test_discard_removes_only_an_empty_unfinished_run(tmp_path: Path) -> None:
    run = RunDir.create("attack", "x", {"a": 1}, out=tmp_path / "r")
    assert run.discard() and not (tmp_path / "r").exists()
    kept = RunDir.create("attack", "x", {"a": 1}, out=tmp_path / "k")
    (kept.path / "checkpoints").mkdir()
    assert not kept.discard() and (kept.path / "run.json").is_file()  # something to resume: kept
    done = RunDir.create("eval", "x", {"a": 1}, out=tmp_path / "d")
    done.finish()
    assert not done.discard() and (done.path / "run.json").is_file()  # a finished run is never removed
    RunDir.create("attack", "x", {"a": 1}, out=tmp_path / "again")
    reopened = RunDir.resume(tmp_path / "again")
    assert not reopened.discard() and (reopened.path / "run.json").is_file()  # a resumed run stays resumable
