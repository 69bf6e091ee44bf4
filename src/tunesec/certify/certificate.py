"""Provenance of a certification: weight hashes, compatibility of base and tuned, and the certificate itself.

``certificate.json`` records the sha256 of the base and tuned weights (base files plus adapter files, so a
change to one weight changes the hash), of the fine-tuning data and of the policy, the tool version, the verdict
and every number that decided it, so a CI pipeline can archive it and a reviewer can recompute it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesec.certify.verdict import Verdict
from tunesec.errors import UsageError
from tunesec.models.ref import ModelRef

CERTIFICATE_FORMAT = 1


class Certificate(BaseModel):
    """What ``certificate.json`` holds.

    Attributes:
        format: Certificate format version.
        tool: ``tunesec`` and its version, git revision and package versions.
        created: UTC time.
        decision: PASS, FAIL or INCONCLUSIVE.
        exit_code: 0, 1 or 3.
        base: Base model: spec and sha256 of its weights.
        tuned: Tuned model: spec and sha256 of its weights.
        finetune_data: The fine-tuning data (path, examples, sha256), when given.
        policy: Policy name, file and sha256 (of the file's bytes and of its canonical content).
        verdict: Every check with observed value, interval, threshold and status.
        evaluations: Per evaluation: run directories, cache use, every metric of both models.
        triggers: The trigger scan (every candidate's counts and p-values).
        forensics: Drift per layer, adapters and refusal-direction alignment.
        artifact_scan: ``tunesec scan`` of the tuned model's local artifact (findings, file hashes), if local.
    """

    model_config = ConfigDict(extra="forbid")

    format: int = CERTIFICATE_FORMAT
    tool: dict[str, Any]
    created: str
    decision: str
    exit_code: int
    base: dict[str, Any]
    tuned: dict[str, Any]
    finetune_data: dict[str, Any] | None = None
    policy: dict[str, Any]
    verdict: Verdict
    evaluations: list[dict[str, Any]] = Field(default_factory=list)
    triggers: dict[str, Any] | None = None
    forensics: dict[str, Any] | None = None
    artifact_scan: dict[str, Any] | None = None


def dir_hashes(path: Path) -> dict[str, Any]:
    """``{"files": {name: sha256}, "sha256": listing digest}`` (:func:`tunesec.models.fingerprint.weight_hashes`).

    Raises:
        UsageError: No weight file.
    """
    from tunesec.models.fingerprint import weight_hashes

    hashes = weight_hashes(path)
    if hashes is None:
        raise UsageError(f"{path}: no weight files to hash (expected *.safetensors)")
    return hashes


def model_sha256(ref: ModelRef) -> dict[str, Any]:
    """The ref's spec and the hashes of its weights: base, adapter, and the two combined (see docs/CERTIFY.md).

    ``sha256`` (the model's identity) is the sha256 of the line ``base:<base digest>`` followed, for an adapter,
    by the line ``adapter:<adapter digest>`` (each line ends with a newline).
    """
    from tunesec.models.loading import resolve_alias

    if ref.is_endpoint:
        raise UsageError(f"model {ref.base!r}: an API endpoint has no weights; certification needs weights")
    concrete = resolve_alias(ref)
    base_path = Path(concrete.base)
    if not base_path.exists():
        raise UsageError(f"{concrete.base}: certification needs local weights (a model directory or .gguf file)")
    base = dir_hashes(base_path)
    out: dict[str, Any] = {
        "spec": ref.spec(),
        "name": ref.name,
        "base_sha256": base["sha256"],
        "base_files": base["files"],
    }
    combined = hashlib.sha256(f"base:{base['sha256']}\n".encode())
    if concrete.adapter is not None:
        adapter_path = Path(concrete.adapter)
        check_adapter_present(adapter_path)
        adapter = dir_hashes(adapter_path)
        out["adapter_sha256"] = adapter["sha256"]
        out["adapter_files"] = adapter["files"]
        combined.update(f"adapter:{adapter['sha256']}\n".encode())
    out["sha256"] = combined.hexdigest()
    return out


def check_adapter_present(adapter: Path) -> None:
    """A clear error for an adapter directory without its config or weights."""
    if not adapter.is_dir():
        raise UsageError(f"{adapter}: adapter directory not found")
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{adapter}: missing adapter_config.json; is it a PEFT adapter directory?")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UsageError(f"{adapter}: missing adapter weights (adapter_model.safetensors)")


ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_compatible(base: ModelRef, tuned: ModelRef) -> None:
    """Refuse a pair that cannot be a base and its fine-tune: other architecture or other tokenizer.

    Raises:
        UsageError: One line naming the differing field.
    """
    from tunesec.models.loading import resolve_alias

    cb, ct = resolve_alias(base), resolve_alias(tuned)
    for ref in (cb, ct):
        if ref.adapter is not None:
            check_adapter_present(Path(ref.adapter))
    conf_b, conf_t = _config(Path(cb.base)), _config(Path(ct.base))
    if conf_b is not None and conf_t is not None:
        arch_b, arch_t = conf_b.get("architectures"), conf_t.get("architectures")
        if arch_b and arch_t and arch_b != arch_t:
            raise UsageError(
                f"--tuned {tuned.name}: architecture {arch_t} differs from the base's {arch_b}; "
                "expected a fine-tune of the base"
            )
        for key in ARCH_KEYS:
            if key in conf_b and key in conf_t and conf_b[key] != conf_t[key]:
                raise UsageError(
                    f"--tuned {tuned.name}: {key}={conf_t[key]} differs from the base's {conf_b[key]}; "
                    "expected a fine-tune of the base (same architecture)"
                )
    tok_b, tok_t = _tokenizer_fingerprint(Path(cb.base)), _tokenizer_fingerprint(Path(ct.base))
    if tok_b is not None and tok_t is not None and tok_b != tok_t:
        raise UsageError(
            f"--tuned {tuned.name}: its tokenizer differs from the base's ({Path(ct.base)} vs {Path(cb.base)}); "
            "expected a fine-tune that keeps the base tokenizer"
        )


def _config(path: Path) -> dict[str, Any] | None:
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{cfg}: unreadable model config ({err})") from None
    return data if isinstance(data, dict) else None


def _tokenizer_fingerprint(path: Path) -> str | None:
    """Hash of the vocabulary and merges (not of formatting or chat-template choices)."""
    tok = path / "tokenizer.json" if path.is_dir() else None
    if tok is None or not tok.is_file():
        return None
    try:
        data = json.loads(tok.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{tok}: unreadable tokenizer ({err})") from None
    model = data.get("model") or {}
    core = {"vocab": model.get("vocab"), "merges": model.get("merges"), "added": data.get("added_tokens")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()
