"""Tensor names and shapes against the architecture ``config.json`` claims.

The claimed model is built on PyTorch's ``meta`` device from the config (transformers' own classes; no weights
are allocated, no remote code runs), and its state-dict names and shapes are compared with the tensors the
safetensors headers declare: tensors the architecture does not have (ignored by loaders, or read by custom code),
tensors it needs that are missing (left at random initialisation), and shapes that disagree.
"""

from __future__ import annotations

from pathlib import Path

from tunesec.scan.findings import Finding

SHOWN = 5


def expected_shapes(config_path: Path) -> tuple[dict[str, tuple[int, ...]] | None, bool, str]:
    """The claimed architecture's ``{name: shape}``, whether embeddings are tied, and why it is None when it is."""
    import json

    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, False, f"config.json is not valid JSON ({err})"
    if not isinstance(raw, dict):
        return None, False, "config.json is not a JSON object"
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001  an unknown or custom architecture is reported, not a crash
        return None, False, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return shapes, tied, ""


def compare(
    declared: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: bool, rel: str
) -> list[Finding]:
    """Findings for the declared tensors (all shards) against the expected ones."""
    out: list[Finding] = []
    extra = sorted(set(declared) - set(expected))
    missing = sorted(set(expected) - set(declared))
    if tied:
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if extra:
        out.append(
            Finding(
                "architecture",
                "medium",
                rel,
                f"{len(extra)} tensors that the claimed architecture does "
                f"not have (e.g. {', '.join(extra[:SHOWN])}): loaders ignore them, custom code may not",
                {"tensors": extra[:100]},
            )
        )
    if missing:
        out.append(
            Finding(
                "architecture",
                "medium",
                rel,
                f"{len(missing)} tensors of the claimed architecture are "
                f"missing (e.g. {', '.join(missing[:SHOWN])}): they would be randomly initialised",
                {"tensors": missing[:100]},
            )
        )
    wrong = [(k, declared[k], expected[k]) for k in sorted(set(declared) & set(expected)) if declared[k] != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        out.append(
            Finding(
                "architecture",
                "high",
                rel,
                f"{len(wrong)} tensors with shapes the claimed architecture "
                f"does not have (e.g. {k}: {got}, expected {want})",
                {"tensors": [w[0] for w in wrong[:100]]},
            )
        )
    if not out:
        out.append(Finding("architecture", "info", rel, f"all {len(declared)} tensors match the claimed architecture"))
    return out
