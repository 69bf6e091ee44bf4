"""The README's Python example runs as written (slow: it loads the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)  # the example writes runs/readme-example here
    exec(compile(block.group(1), str(README), "exec"), {})  # noqa: S102
    assert (tmp_path / "runs" / "readme-example" / "metrics.json").is_file()
