"""PEFT adapters: the config against the base, replaced modules, and the size of the update per module.

- ``adapter_config.json``: LoRA rank and alpha sane (``1 <= r <= min(in, out)`` of every targeted module,
  ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) at most :data:`MAX_SCALE`); every target module exists in
  the base (when the base is known); ``modules_to_save`` or ``trainable_token_indices`` that replace the
  embeddings or the LM head are flagged: such an adapter ships whole matrices, not a low-rank update, and can
  rewrite what every token means or what the model can say.
- The weights: every LoRA pair complete with the declared rank; no full tensor the config does not declare;
  no NaN or infinity.
- The update: the Frobenius norm of each module's merged delta ``B @ A * scale``
  (:func:`tunesec.certify.forensics.adapter_deltas`). Within one kind of module (``q_proj`` of every layer ...)
  a fine-tune spreads its update; a module whose norm exceeds :data:`OUTLIER_FACTOR` times its kind's median
  concentrates it (an implanted edit). With a base, the relative update ``||dW|| / ||W||`` of each module above
  :data:`MAX_RELATIVE` is flagged (a LoRA fine-tune moves weights by a few percent).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from tunesec.scan.findings import Finding

MAX_SCALE = 16.0
MAX_RANK = 1024
OUTLIER_FACTOR = 8.0
MAX_RELATIVE = 0.5
EMBEDDING_NAMES = (
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "embeddings",
    "tok_embeddings",
    "lm_head",
    "embed_out",
    "output",
    "token_embd",
)
_LAYER = re.compile(r"\.(\d+)\.")


def replaces_embeddings(module: str) -> bool:
    """Whether a module name (a ``modules_to_save`` entry) is the embeddings or the LM head."""
    last = module.split(".")[-1]
    return last in EMBEDDING_NAMES


def check_adapter_config(cfg: dict[str, Any], rel: str) -> list[Finding]:
    """Config-only checks (no weights, no base)."""
    out: list[Finding] = []

    def add(severity: str, reason: str, **detail: Any) -> None:
        out.append(Finding("adapter", severity, rel, reason, detail))

    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        add("low", f"peft_type {peft_type or 'missing'}: only LoRA adapters are checked in depth")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        add("high", f"rank r={rank!r}: expected a positive integer")
    elif rank > MAX_RANK:
        add("medium", f"rank r={rank} is above {MAX_RANK}: not a low-rank update")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        add("high", f"lora_alpha={alpha!r}: expected a positive number")
    elif isinstance(rank, int) and rank >= 1:
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        if scale > MAX_SCALE:
            add("medium", f"scaling alpha/r = {scale:g} is above {MAX_SCALE:g}: the update is amplified", scale=scale)
    for key in ("rank_pattern", "alpha_pattern"):
        for name, value in (cfg.get(key) or {}).items():
            if not isinstance(value, int | float) or value <= 0 or (key == "rank_pattern" and value > MAX_RANK):
                add("medium", f"{key}[{name!r}] = {value!r}: expected a positive value (rank <= {MAX_RANK})")
    saved = cfg.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    for module in saved:
        if replaces_embeddings(str(module)):
            add(
                "high",
                f"modules_to_save replaces {module!r} (embeddings or LM head) wholesale: the adapter can "
                "rewrite what tokens mean or what the model can emit",
                module=module,
            )
        else:
            add("low", f"modules_to_save replaces {module!r} wholesale (a full matrix, not a low-rank update)")
    tokens = cfg.get("trainable_token_indices")
    if tokens:
        add("medium", f"trainable_token_indices {str(tokens)[:120]}: the adapter replaces embedding rows")
    if cfg.get("layer_replication"):
        add("medium", "layer_replication changes the model's depth")
    return out


def check_adapter_weights(
    adapter_dir: Path, cfg: dict[str, Any], rel: str, base_shapes: dict[str, tuple[int, ...]] | None
) -> list[Finding]:
    """Weight checks: LoRA pairs, ranks, undeclared full tensors, NaN, modules against the base's shapes."""
    from safetensors.torch import load_file

    out: list[Finding] = []

    def add(severity: str, reason: str, **detail: Any) -> None:
        out.append(Finding("adapter", severity, rel, reason, detail))

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    saved = cfg.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else [str(s) for s in saved]
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if not bool(t.float().isfinite().all()):
            add("high", f"tensor {key!r} holds NaN or infinite values")
        m = re.search(r"\.lora_(A|B)(?:\.[^.]+)?\.weight$", key)
        if m:
            module = key[: m.start()].removeprefix("base_model.model.")
            pairs.setdefault(module, {})[m.group(1)] = t
        elif "lora_" in key or key.endswith(("lora_magnitude_vector", ".bias")):
            continue
        else:
            module = key.removeprefix("base_model.model.").rsplit(".", 1)[0].replace(".modules_to_save.default", "")
            declared = any(module == s or module.endswith("." + s) for s in saved)
            if replaces_embeddings(module) and declared:
                continue  # reported from the config
            add(
                "high" if replaces_embeddings(module) or not declared else "low",
                f"full tensor {key!r} {tuple(t.shape)} in the adapter"
                + ("" if declared else ", not declared in modules_to_save: it silently replaces a base weight"),
                tensor=key,
            )
    rank = cfg.get("r") if isinstance(cfg.get("r"), int) else None
    rank_pattern = cfg.get("rank_pattern") or {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            add("high", f"module {module}: lora_{'B' if 'A' in ab else 'A'} missing")
            continue
        a, b = ab["A"], ab["B"]
        want = next((v for k, v in rank_pattern.items() if module.endswith(k)), rank)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            add("high", f"module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not multiply")
            continue
        if want is not None and a.shape[0] != want:
            add("medium", f"module {module}: rank {a.shape[0]} in the weights, {want} in adapter_config.json")
        if base_shapes is not None:
            shape = base_shapes.get(f"{module}.weight")
            if shape is None:
                add("high", f"module {module} does not exist in the base: the adapter targets another model")
            elif len(shape) == 2 and (shape[0], shape[1]) != (b.shape[0], a.shape[1]):
                add(
                    "high",
                    f"module {module}: update is {b.shape[0]}x{a.shape[1]}, the base weight {shape[0]}x{shape[1]}",
                )
            elif len(shape) == 2 and a.shape[0] > min(shape):
                add("medium", f"module {module}: rank {a.shape[0]} exceeds min(in, out) = {min(shape)}")
    if not pairs and not any(f.severity in ("high", "critical") for f in out):
        add("medium", "adapter has no LoRA matrices")
    targets = cfg.get("target_modules")
    if base_shapes is not None and isinstance(targets, list):
        base_leaf = {k.removesuffix(".weight").split(".")[-1] for k in base_shapes}
        for target in targets:
            if str(target).split(".")[-1] not in base_leaf and not any(k.startswith(str(target)) for k in base_shapes):
                add("high", f"target module {target!r} does not exist in the base")
    return out


def update_norms(adapter_dir: Path, rel: str) -> tuple[list[Finding], dict[str, float], dict[str, Any]]:
    """Each module's merged-delta norm, flagging modules far above their kind's median; returns the deltas too."""
    from tunesec.certify.forensics import adapter_deltas
    from tunesec.errors import UsageError

    try:
        deltas, _ = adapter_deltas(adapter_dir)
    except (UsageError, RuntimeError, ValueError, ZeroDivisionError, TypeError) as err:
        return [Finding("adapter", "high", rel, f"cannot merge the LoRA update ({err})")], {}, {}
    norms = {k.removesuffix(".weight"): float(v.norm()) for k, v in deltas.items()}
    out: list[Finding] = []
    kinds: dict[str, list[tuple[str, float]]] = {}
    for module, norm in norms.items():
        kinds.setdefault(_LAYER.sub(".N.", module), []).append((module, norm))
    for kind, items in kinds.items():
        if len(items) < 4:
            continue
        median = statistics.median(n for _, n in items)
        for module, norm in items:
            if median > 0 and norm > OUTLIER_FACTOR * median:
                out.append(
                    Finding(
                        "adapter",
                        "medium",
                        rel,
                        f"module {module}: update norm {norm:.3g} is "
                        f"{norm / median:.1f}x the median of {kind} ({median:.3g}): a concentrated edit",
                        {"module": module, "norm": norm, "median": median},
                    )
                )
    return out, norms, deltas


def relative_updates(deltas: dict[str, Any], base: dict[str, Any], rel: str) -> tuple[list[Finding], dict[str, float]]:
    """``||dW|| / ||W||`` per module against the base weights; flags those above :data:`MAX_RELATIVE`."""
    out: list[Finding] = []
    ratios: dict[str, float] = {}
    for key, delta in deltas.items():
        w = base.get(key)
        if w is None or tuple(w.shape) != tuple(delta.shape):
            continue
        denom = float(w.float().norm())
        ratios[key] = float(delta.norm()) / denom if denom > 0 else math.inf
    for key, ratio in ratios.items():
        if ratio > MAX_RELATIVE:
            out.append(
                Finding(
                    "adapter",
                    "medium",
                    rel,
                    f"module {key.removesuffix('.weight')}: the update is "
                    f"{ratio:.2f}x the base weight's norm (a LoRA fine-tune moves a few percent)",
                    {"ratio": ratio},
                )
            )
    return out, ratios


def read_adapter_config(path: Path, rel: str) -> tuple[dict[str, Any] | None, list[Finding]]:
    """The parsed config, or a finding saying why it could not be read."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, [Finding("adapter", "high", rel, f"adapter_config.json is not valid JSON ({err})")]
    if not isinstance(cfg, dict):
        return None, [Finding("adapter", "high", rel, "adapter_config.json is not a JSON object")]
    return cfg, []
