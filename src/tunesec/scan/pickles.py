"""Pickle payloads: what a pickle stream would import and call when loaded, read without unpickling it.

The stream is decompiled by `fickling <https://github.com/trailofbits/fickling>`_ (Trail of Bits): its symbolic
interpreter turns the opcodes into the Python it would run (imports, calls) without executing anything.
fickling's own verdict calls every non-standard import unsafe, which flags every PyTorch checkpoint; tunesec
instead checks each import against an allow-list of the globals that rebuild tensors (:data:`ALLOWED_GLOBALS`,
the globals PyTorch's ``weights_only`` unpickler accepts, plus numpy's array rebuilding), and keeps fickling's
structural analyses (invalid opcodes, interpretation errors, resource exhaustion, overtly bad calls).

Handled containers: a bare pickle of any protocol (``.pkl``, legacy ``.bin``/``.pt``: several pickles in a row, as
the pre-1.6 ``torch.save`` wrote; protocols 0 and 1 have no magic byte, so a file is taken for a pickle when
:mod:`pickletools` (a disassembler: it executes nothing) walks its first bytes to a ``STOP``), and a zip
checkpoint (``torch.save`` since 1.6: ``<name>/data.pkl`` plus raw storages; every ``.pkl`` member is scanned,
and so is any other member that starts as a protocol 2+ pickle stream).
"""

from __future__ import annotations

import ast
import io
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tunesec.scan.findings import Finding

PICKLE_PROTO = 0x80
ZIP_MAGIC = b"PK\x03\x04"
MAX_STACKED = 16  # the legacy torch format has five pickles in a row; more is not a checkpoint
SNIFF_BYTES = 1 << 20  # how much of a file the protocol 0/1 sniffing disassembles
# opcodes a protocol 0/1 pickle may start with (protocol 2+ starts with PROTO, 0x80)
_TEXT_START = frozenset(ord(o.code) for o in pickletools.opcodes if o.proto <= 1 and o.code not in ".")

_TORCH_TYPES = re.compile(
    r"^torch(\.cuda)?(\.sparse)?\.(BFloat16|Bool|Byte|Char|ComplexDouble|ComplexFloat|Double|Float|Half|Int|Long|"
    r"Short|QInt32|QInt8|QUInt2x4|QUInt4x2|QUInt8|Untyped)(Storage|Tensor)$"
)
_TORCH_DTYPES = re.compile(
    r"^torch\.(bfloat16|bool|complex(32|64|128)|float(16|32|64)|float8_\w+|float4_\w+|u?int\d+|bits\w+|q(u)?int\w+|"
    r"per_(tensor|channel)_\w+)$"
)
ALLOWED_GLOBALS = frozenset(
    {
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
    }
)
# Imports that are an attack whatever the context: code execution, the file system, the network, nested loading.
DANGEROUS_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "socket",
        "shutil",
        "runpy",
        "importlib",
        "pickle",
        "_pickle",
        "marshal",
        "types",
        "code",
        "codeop",
        "ctypes",
        "pty",
        "commands",
        "webbrowser",
        "requests",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "telnetlib",
        "asyncio",
        "multiprocessing",
        "threading",
        "signal",
        "platform",
        "pathlib",
        "tempfile",
        "glob",
        "io",
        "dill",
        "cloudpickle",
        "joblib",
        "operator",
        "functools",
        "pydoc",
        "timeit",
        "trace",
        "profile",
        "cProfile",
        "pdb",
        "bdb",
    }
)
DANGEROUS_BUILTINS = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "open",
        "__import__",
        "getattr",
        "setattr",
        "delattr",
        "globals",
        "locals",
        "vars",
        "input",
        "breakpoint",
        "memoryview",
        "type",
        "object",
        "super",
        "apply",
        "execfile",
        "file",
        "reload",
    }
)
# fickling analyses whose findings tunesec replaces with its allow-list (they flag every torch checkpoint)
_REPLACED_ANALYSES = frozenset({"NonStandardImports", "UnusedVariables", "UnsafeImportsML"})
# fickling analyses of the payload itself: reported through the import that carries it
_PAYLOAD_ANALYSES = frozenset({"OvertlyBadEval", "UnsafeImports", "BadCalls"})


def is_allowed(dotted: str) -> bool:
    """Whether ``module.name`` is a global that only rebuilds tensors, arrays or containers."""
    if dotted.startswith("__builtin__."):  # protocol 2 spells the Python 3 module by its Python 2 name
        dotted = "builtins." + dotted.removeprefix("__builtin__.")
    if dotted in ALLOWED_GLOBALS:
        return True
    if dotted.startswith("torch._utils._rebuild_"):
        return True
    return bool(_TORCH_TYPES.match(dotted) or _TORCH_DTYPES.match(dotted))


def looks_like_pickle(head: bytes, *, whole: bool, min_ops: int = 1) -> bool:
    """Whether ``head`` disassembles as a pickle stream: ``min_ops`` opcodes or more, then ``STOP``.

    ``head`` is the start of a stream (``whole``: all of it); a stream longer than ``head`` that disassembles
    cleanly to its end (64 opcodes or more) counts too. Nothing is executed: :func:`pickletools.genops` only
    decodes opcodes and their arguments.
    """
    if not head or (head[0] != PICKLE_PROTO and head[0] not in _TEXT_START):
        return False
    count = 0
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(head)):
            if opcode.name == "STOP":
                return count >= min_ops
            count += 1
    except (ValueError, UnicodeDecodeError, EOFError, OverflowError, struct.error):
        return not whole and count >= 64  # cut by the window, not by a bad opcode? only a long clean run counts
    return False


def sniff(path: Path) -> str | None:
    """``"zip"`` for a zip checkpoint, ``"pickle"`` for a pickle stream (any protocol), else None."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        whole = not fh.read(1)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return "pickle"
    if looks_like_pickle(head, whole=whole):
        return "pickle"  # protocol 0 or 1: text opcodes, no magic byte
    return None


def scan_pickle_file(path: Path, rel: str) -> list[Finding]:
    """Findings for a pickle file or a zip checkpoint at ``path`` (shown as ``rel``)."""
    kind = sniff(path)
    if kind == "zip":
        return scan_zip_checkpoint(path, rel)
    with open(path, "rb") as fh:  # streamed: a legacy checkpoint's storages after its pickles are never read
        return scan_pickle_stream(fh, rel)


def scan_zip_checkpoint(path: Path, rel: str) -> list[Finding]:
    """Every ``.pkl`` member of a zip checkpoint (``data.pkl`` of ``torch.save``), read from the archive."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        return [Finding("pickle", "high", rel, f"corrupt zip checkpoint ({err}); it cannot be inspected")]
    findings: list[Finding] = []
    with archive:
        members = [i for i in archive.infolist() if i.filename.endswith(".pkl")]
        if not members:
            return [Finding("pickle", "medium", rel, "zip archive without a data.pkl: not a PyTorch checkpoint")]
        names = [i.filename for i in archive.infolist()]
        outside = [n for n in names if n.startswith("/") or ".." in Path(n).parts]
        if outside:
            findings.append(
                Finding("pickle", "high", rel, f"zip member with an absolute or parent path: {outside[0]!r}")
            )
        for info in members + _hidden_pickles(archive, members):
            where = f"{rel}:{info.filename}"
            if not info.filename.endswith(".pkl"):
                reason = "zip member that is a pickle stream but not named .pkl: a hidden pickle"
                findings.append(Finding("pickle", "high", where, reason))
            if info.file_size > 1 << 30:
                findings.append(Finding("pickle", "high", where, "pickle member over 1 GiB"))
                continue
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, NotImplementedError, zlib.error, OSError, EOFError) as err:
                findings.append(Finding("pickle", "high", where, f"zip member cannot be read ({err}); treat as unsafe"))
                continue
            findings.extend(scan_pickle_bytes(data, where))
    return findings


def _hidden_pickles(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """Members not named ``.pkl`` that start as a protocol 2+ pickle stream (a raw storage almost never does)."""
    out = []
    for info in archive.infolist():
        if info in members or info.is_dir():
            continue
        try:
            with archive.open(info) as fh:
                head = fh.read(2)
                if len(head) < 2 or head[0] != PICKLE_PROTO or not 2 <= head[1] <= 5:
                    continue
                head += fh.read(SNIFF_BYTES)
        except (zipfile.BadZipFile, NotImplementedError, zlib.error, OSError, EOFError):
            continue  # a storage that cannot be read is torch's problem; a .pkl that cannot is reported
        if looks_like_pickle(head, whole=len(head) >= info.file_size, min_ops=3):
            out.append(info)
    return out


def _stacked(stream: BinaryIO) -> Iterator[tuple[int, Any]]:
    """Each pickle in ``stream`` (legacy torch files hold several in a row, then raw storage bytes)."""
    from fickling.fickle import Pickled, PickleDecodeError

    for index in range(MAX_STACKED + 1):
        start = stream.tell()
        head = stream.read(SNIFF_BYTES)
        whole = not stream.read(1)
        stream.seek(start)
        if not head or (start > 0 and not looks_like_pickle(head, whole=whole)):
            return  # raw storage bytes follow the last pickle of a legacy checkpoint
        if index == MAX_STACKED:
            yield start, f"more than {MAX_STACKED} pickles in a row; the rest were not inspected: treat as unsafe"
            return
        try:
            pickled = Pickled.load(stream, fail_on_decode_error=False)
        except PickleDecodeError as err:
            yield start, err
            return
        except Exception:  # noqa: BLE001  fickling lacks some opcodes (FLOAT, ...): fall back to the opcode walk
            stream.seek(start)
            try:
                pickled = OpcodeImports(opcode_imports(stream))
            except (ValueError, UnicodeDecodeError, EOFError, OverflowError, struct.error) as err:
                yield start, err
                return
        yield start, pickled
        if stream.tell() <= start:
            return


class OpcodeImports(list[str]):
    """The globals a pickle imports, found by walking its opcodes (when fickling cannot decompile it)."""


_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)


def opcode_imports(stream: BinaryIO) -> list[str]:
    """``module.name`` of every GLOBAL, INST and STACK_GLOBAL up to ``STOP`` (memoized strings followed).

    :func:`pickletools.genops` only decodes; nothing runs. A STACK_GLOBAL whose operands are not the two
    strings pushed just before it is reported as ``?.?`` (never allowed).
    """
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed, as far as strings are concerned (None: anything else)
    out: list[str] = []
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            out.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL":
            mod, attr = recent[-2:] if len(recent) >= 2 else [None, None]
            out.append(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else "?.?")
        if name in _STRING_OPS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(str(arg))] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(str(arg))))
        elif name not in ("PROTO", "FRAME"):
            recent.append(None)
        if name == "STOP":
            break
    return out


def _dotted(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [f"{node.module or ''}.{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def scan_pickle_bytes(data: bytes, rel: str) -> list[Finding]:
    """Findings for the pickle stream(s) in ``data``."""
    return scan_pickle_stream(io.BytesIO(data), rel)


def scan_pickle_stream(stream: BinaryIO, rel: str) -> list[Finding]:
    """Findings for the pickle stream(s) read from a seekable binary ``stream``."""
    from fickling.analysis import Severity, check_safety

    findings: list[Finding] = []
    seen = 0
    for start, pickled in _stacked(stream):
        where = rel if start == 0 else f"{rel}@{start}"
        if isinstance(pickled, str):
            findings.append(Finding("pickle", "high", where, pickled))
            break
        if isinstance(pickled, Exception):
            sev = "medium" if seen else "high"
            findings.append(Finding("pickle", sev, where, f"not a decodable pickle stream ({pickled})"))
            break
        seen += 1
        if isinstance(pickled, OpcodeImports):
            findings.extend(_opcode_findings(list(pickled), where))
            continue
        try:
            imports = [d for node in pickled.properties.imports for d in _dotted(node)]
            results = check_safety(pickled).results
        except Exception as err:  # noqa: BLE001  a decompiler failure on hostile input is itself a finding
            findings.append(
                Finding(
                    "pickle",
                    "high",
                    where,
                    f"pickle could not be decompiled safely ({type(err).__name__}: {err}); treat it as unsafe",
                )
            )
            continue
        bad = sorted({d for d in imports if not is_allowed(d)})
        findings.extend(_import_finding(dotted, where, _calls_of(pickled, dotted.rpartition(".")[2])) for dotted in bad)
        before = len(findings)
        messages: set[str] = set()
        for result in results:
            name = result.analysis_name or "structure"
            if name in _REPLACED_ANALYSES or result.severity < Severity.SUSPICIOUS or result.message in messages:
                continue
            if name in _PAYLOAD_ANALYSES and (bad or result.severity < Severity.LIKELY_OVERTLY_MALICIOUS):
                continue  # the payload's import is reported by name above; other calls are tensor rebuilding
            messages.add(result.message)
            overt = result.severity >= Severity.LIKELY_OVERTLY_MALICIOUS
            findings.append(
                Finding("pickle", "critical" if overt else "high", where, f"fickling ({name}): {result.message}")
            )
        if not bad and len(findings) == before:
            findings.append(
                Finding(
                    "pickle",
                    "info",
                    where,
                    f"pickle imports only tensor-rebuilding globals ({len(set(imports))} distinct); it was not loaded",
                    {"imports": sorted(set(imports))},
                )
            )
    if seen == 0 and not findings:
        findings.append(Finding("pickle", "high", rel, "empty or undecodable pickle stream"))
    return findings


def _calls_of(pickled: Any, name: str) -> list[str]:
    out = []
    for call in pickled.properties.calls:
        text = ast.unparse(call)
        if text.startswith(name + "("):
            out.append(text[:300])
    return out[:5]


def _import_finding(dotted: str, where: str, calls: list[str]) -> Finding:
    module, _, name = dotted.rpartition(".")
    top = module.split(".")[0]
    dangerous = top in DANGEROUS_MODULES or (top in ("builtins", "__builtin__") and name in DANGEROUS_BUILTINS)
    return Finding(
        "pickle",
        "critical" if dangerous else "high",
        where,
        f"loading imports {dotted}"
        + (f" and calls {calls[0][:160]}" if calls else "")
        + (": code execution, file or network access" if dangerous else ", which does not rebuild tensors")
        + "; never load this file",
        {"import": dotted, "calls": calls},
    )


def _opcode_findings(imports: list[str], where: str) -> list[Finding]:
    bad = sorted({d for d in imports if not is_allowed(d)})
    if bad:
        return [_import_finding(dotted, where, []) for dotted in bad]
    return [
        Finding(
            "pickle",
            "info",
            where,
            f"pickle imports only tensor-rebuilding globals ({len(set(imports))} distinct; found by walking its "
            "opcodes, fickling cannot decompile it); it was not loaded",
            {"imports": sorted(set(imports))},
        )
    ]
