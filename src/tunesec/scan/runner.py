"""``scan()``: inspect an artifact without loading it; write ``scan.json`` and ``report.html`` into a new run.

The artifact is a model directory, an adapter directory, a ``.gguf``, a ``.safetensors`` or a pickle checkpoint.

Every input problem (missing path, unreadable file, nothing to scan, unknown format, a bad ``--base``) raises a
:class:`UsageError` before anything is written. A pickle is never unpickled, a template never rendered outside
the sandbox, weights never loaded into a model; only ``--base`` loads the base model, for the forward passes of
the refusal direction (no generation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesec.errors import UsageError
from tunesec.scan import architecture, base_model, pickles, provenance, templates
from tunesec.scan.findings import Finding, severity_rank
from tunesec.scan.gguf_file import is_gguf, read_gguf
from tunesec.scan.safetensors_header import read_header

SCAN_FILE = "scan.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
KNOWN_FILES = (
    "adapter_config.json",
    "config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
    "README.md",
)
SKIP_DIRS = {".git", "__pycache__", ".cache"}
MAX_FILES = 10_000
MAX_TEXT_BYTES = 32 << 20  # JSON, template and card files are read whole; a real one is a few MB at most


@dataclass
class ScanResult:
    """What a scan found and where it wrote it."""

    path: str
    kind: str
    findings: list[Finding]
    files: dict[str, dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)
    forensics: dict[str, Any] | None = None
    base: str | None = None
    run_dir: str | None = None
    seconds: float = 0.0

    @property
    def flagged(self) -> list[Finding]:
        """Findings above ``info``, most severe first."""
        return sorted((f for f in self.findings if f.flagged), key=lambda f: -severity_rank(f.severity))

    @property
    def exit_code(self) -> int:
        """0 clean, 1 findings."""
        return int(bool(self.flagged))

    @property
    def counts(self) -> dict[str, int]:
        """Number of findings per severity (notes included as ``info``)."""
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.severity] = out.get(f.severity, 0) + 1
        return out

    @property
    def summary_line(self) -> str:
        """One line: the decision and the counts."""
        counts = self.counts
        parts = [f"{counts[s]} {s}" for s in ("critical", "high", "medium", "low") if counts.get(s)]
        head = "FINDINGS" if self.exit_code else "CLEAN"
        return f"{head}: {self.kind} {self.path}, {len(self.files)} files; {', '.join(parts) or 'no findings'}"

    def to_json(self) -> dict[str, Any]:
        """The ``scan.json`` document."""
        from tunesec import __version__

        return {
            "tool": {"name": "tunesec", "version": __version__},
            "path": self.path,
            "kind": self.kind,
            "base": self.base,
            "decision": "findings" if self.exit_code else "clean",
            "exit_code": self.exit_code,
            "counts": self.counts,
            "seconds": self.seconds,
            "findings": [f.to_json() for f in sorted(self.findings, key=lambda f: -severity_rank(f.severity))],
            "files": self.files,
            "provenance": self.provenance,
            "forensics": self.forensics,
        }


# -- inputs ----------------------------------------------------------------------------------------------


def _readable(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or err})") from None


def _role(path: Path) -> str | None:
    """What a file is to the scan, or None (hashed only)."""
    name = path.name
    if name in KNOWN_FILES:
        return name
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".gguf") or is_gguf(path):
        return "gguf"
    if pickles.sniff(path) is not None or (name.endswith(PICKLE_SUFFIXES) and not name.endswith(".bin")):
        return "pickle"  # a .bin is any binary: a pickle only when its bytes say so
    return None


def collect(path: Path) -> tuple[str, list[Path], dict[Path, str]]:
    """The artifact's kind, every file in it, and the role of the files the scan inspects."""
    if not path.exists():
        raise UsageError(f"{path}: not found; expected a model or adapter directory, .gguf, .safetensors or pickle")
    if path.is_file():
        _readable(path)
        role = _role(path)
        if role is None or role in ("README.md", "model.safetensors.index.json"):
            raise UsageError(
                f"{path}: unknown format; expected a .gguf, .safetensors or pickle checkpoint (.pt/.bin/.pkl), or "
                "a model or adapter directory"
            )
        kind = {"safetensors": "safetensors", "gguf": "gguf", "pickle": "pickle"}.get(role, "config")
        return kind, [path], {path: role}
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{path}: cannot read the directory (permission denied)")
    files: list[Path] = []

    def unreadable(err: OSError) -> None:
        raise UsageError(f"{err.filename}: cannot read the directory ({err.strerror or err})")

    for root, dirs, names in os.walk(path, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files.extend(Path(root) / n for n in sorted(names) if (Path(root) / n).is_file())
        if len(files) > MAX_FILES:
            raise UsageError(f"{path}: more than {MAX_FILES} files; point tunesec scan at the model's own folder")
    for f in files:
        _readable(f)
    roles = {f: r for f in files if (r := _role(f)) is not None}
    inspected = {r for r in roles.values() if r not in ("README.md",)}
    if not inspected:
        raise UsageError(
            f"{path}: nothing to scan (no *.safetensors, *.gguf, pickle checkpoint, adapter_config.json, config.json "
            "or chat template in it)"
        )
    present = {f.name for f in files}
    kind = "adapter" if "adapter_config.json" in present else "model" if "config.json" in present else "directory"
    return kind, files, roles


# -- the scan --------------------------------------------------------------------------------------------


def scan(
    path: str | Path,
    *,
    base: str | None = None,
    out: str | Path | None = None,
    root: str | Path = "runs",
    write: bool = True,
    forensics: bool = True,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> ScanResult:
    """Scan an artifact (see the module docstring).

    Args:
        path: Model directory, adapter directory, ``.gguf``, ``.safetensors`` or pickle checkpoint.
        base: The base model (alias, directory, ``.gguf``): adapters and templates are compared with it, and
            with ``forensics`` the weight drift by layer and refusal-direction alignment are measured.
        out: New or empty run directory (default ``root/<UTC stamp>-scan-<name>``).
        root: Parent of auto-named run directories.
        write: Write the run directory (False: only return the result; ``certify`` uses this).
        forensics: With ``base``, compute drift and refusal-direction alignment (loads the base for forward
            passes).
        log: Where progress lines go.
        progress: Show a progress bar while hashing large artifacts.

    Raises:
        UsageError: Missing or unreadable path, nothing to scan, unknown format, bad ``base`` or ``out``.
    """
    from tunesec.store.run import RunDir

    started = time.perf_counter()
    say = log or (lambda _msg: None)
    target = Path(path)
    kind, files, roles = collect(target)
    base_info = base_model.resolve_base(base) if base is not None else None
    run = None
    if write:
        spec = {"path": str(target), "base": base, "forensics": forensics}
        run = RunDir.create("scan", f"scan-{target.name}", spec, out=out, root=root)
    try:
        result = _scan(target, kind, files, roles, base, base_info, forensics, say, progress)
    except BaseException:
        if run is not None:
            run.discard()
        raise
    result.seconds = round(time.perf_counter() - started, 2)
    if run is not None:
        from tunesec.scan.report import render_scan_report

        doc = result.to_json()
        run.write_json(SCAN_FILE, doc)
        render_scan_report(run.path, doc)
        run.finish(metrics={"exit_code": result.exit_code, "counts": result.counts}, seconds=result.seconds)
        result.run_dir = str(run.path)
    return result


def _rel(target: Path, f: Path) -> str:
    return f.name if target.is_file() else str(f.relative_to(target))


def _scan(
    target: Path,
    kind: str,
    files: list[Path],
    roles: dict[Path, str],
    base: str | None,
    base_info: dict[str, Any] | None,
    forensics: bool,
    say: Callable[[str], None],
    progress: bool = False,
) -> ScanResult:
    findings: list[Finding] = []
    prov: dict[str, Any] = {}
    say(f"scan: hashing {len(files)} files")
    hashes = provenance.file_hashes(target, files, progress=progress)
    headers: dict[Path, Any] = {}
    for f in [f for f, role in roles.items() if role in KNOWN_FILES and f.stat().st_size > MAX_TEXT_BYTES]:
        reason = f"{f.stat().st_size} bytes, over the {MAX_TEXT_BYTES >> 20} MiB a {roles.pop(f)} needs: not read"
        findings.append(Finding("provenance", "medium", _rel(target, f), reason))
    for f, role in roles.items():
        rel = _rel(target, f)
        if role == "safetensors":
            say(f"scan: safetensors header of {rel}")
            headers[f] = read_header(f, rel)
            findings.extend(headers[f].findings)
        elif role == "gguf":
            say(f"scan: GGUF header and tensors of {rel}")
            info = read_gguf(f, rel)
            findings.extend(info.findings)
            prov[rel] = info.provenance
            base_tpl = (base_info or {}).get("template")
            for key, tpl in info.templates.items():
                findings.extend(
                    templates.check_template(
                        tpl,
                        f"{rel}:{key}",
                        tokens=info.tokens,
                        specials=info.control_tokens,
                        base=base_tpl,
                        base_tokens=(base_info or {}).get("tokens"),
                    )
                )
            if not info.templates and info.findings == []:
                findings.append(Finding("template", "info", rel, "no chat template in the GGUF metadata"))
        elif role == "pickle":
            say(f"scan: pickle opcodes of {rel}")
            findings.extend(pickles.scan_pickle_file(f, rel))
        elif role == "README.md":
            fields, notes = provenance.card_fields(f, rel)
            findings.extend(notes)
            if fields:
                prov[rel] = fields
        elif role in ("config.json", "adapter_config.json"):
            fields = provenance.config_fields(f)
            if fields:
                prov[rel] = fields
    for f, role in roles.items():
        rel = _rel(target, f)
        if role == "tokenizer_config.json" or role.startswith("chat_template."):
            findings.extend(_template_file(f, rel, role, base_info))
        elif role == "config.json":
            findings.extend(_architecture(f, rel, headers))
        elif role == "model.safetensors.index.json":
            findings.extend(_index(f, rel, headers))
    forensics_doc = None
    adapter_cfgs = [f for f, r in roles.items() if r == "adapter_config.json"]
    for cfg_path in adapter_cfgs:
        found, forensics_doc = base_model.check_adapter(
            cfg_path, _rel(target, cfg_path), base, base_info, forensics, say
        )
        findings.extend(found)
    if forensics and base_info is not None and kind == "model" and forensics_doc is None:
        forensics_doc, found = base_model.weight_forensics(base_info, {"base": str(target)}, say)
        findings.extend(found)
    return ScanResult(
        path=str(target),
        kind=kind,
        findings=findings,
        files=hashes,
        provenance=prov,
        forensics=forensics_doc,
        base=base,
    )


def _template_file(f: Path, rel: str, role: str, base_info: dict[str, Any] | None) -> list[Finding]:
    tokens: dict[str, str] = {}
    specials: list[str] = []
    if role == "chat_template.jinja":
        found = {"chat_template": f.read_text(encoding="utf-8", errors="replace")}
        sibling = f.parent / "tokenizer_config.json"
        if sibling.is_file():
            tokens, specials = templates.tokens_of_tokenizer_config(base_model.read_json(sibling) or {})
    else:
        cfg = base_model.read_json(f)
        if cfg is None:
            return [Finding("template", "medium", rel, f"{role} is not a JSON object")]
        found = templates.templates_of_tokenizer_config(cfg)
        tokens, specials = templates.tokens_of_tokenizer_config(cfg)
    out: list[Finding] = []
    base_tpl = (base_info or {}).get("template")
    for key, tpl in found.items():
        out.extend(
            templates.check_template(
                tpl,
                f"{rel}:{key}" if key != "chat_template" else rel,
                tokens=tokens,
                specials=specials,
                base=base_tpl,
                base_tokens=(base_info or {}).get("tokens"),
            )
        )
    return out


def _declared(directory: Path, headers: dict[Path, Any]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for f, h in headers.items():
        if f.parent == directory and not f.name.startswith("adapter_"):
            out.update({name: tuple(t.shape) for name, t in h.tensors.items()})
    return out


def _architecture(cfg: Path, rel: str, headers: dict[Path, Any]) -> list[Finding]:
    declared = _declared(cfg.parent, headers)
    if not declared:
        return []
    expected, tied, why = architecture.expected_shapes(cfg)
    if expected is None:
        return [
            Finding(
                "architecture",
                "low",
                rel,
                f"the claimed architecture cannot be built without remote code ({why}); tensor names not checked",
            )
        ]
    return architecture.compare(declared, expected, tied, rel)


def _index(index: Path, rel: str, headers: dict[Path, Any]) -> list[Finding]:
    data = base_model.read_json(index)
    weight_map = (data or {}).get("weight_map")
    if not isinstance(weight_map, dict):
        return [Finding("safetensors", "medium", rel, "index has no weight_map")]
    out = []
    for name, shard in weight_map.items():
        h = headers.get(index.parent / str(shard))
        if h is None:
            out.append(
                Finding("safetensors", "high", rel, f"weight_map sends {name!r} to {shard!r}, which is not here")
            )
        elif name not in h.tensors:
            out.append(Finding("safetensors", "high", rel, f"weight_map sends {name!r} to {shard!r}, which lacks it"))
        if len(out) >= 5:
            break
    return out
