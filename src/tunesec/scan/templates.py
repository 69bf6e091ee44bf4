"""Chat templates: forbidden constructs, and what the template adds to probe conversations.

A chat template is code that ships with the weights (``tokenizer_config.json``, ``chat_template.jinja``, the
GGUF key ``tokenizer.chat_template``). It is rendered here exactly as tunesec renders it for generation
(:class:`tunesec.models.chat.ChatFormatter`: Jinja's immutable sandbox) on probe conversations whose every
message carries a distinctive marker. Everything the rendering holds beyond the messages, the special tokens
and the role names is text the *template* adds:

- with an explicit system message, added words are flagged (a hidden instruction or a tool call the user never
  sees); without one, they are the template's default system prompt (a note, shown in the report);
- a message whose content does not appear verbatim (in order) is flagged: the template drops or rewrites it;
- with a base template, each probe's rendering is compared with the base's; any difference is flagged, and text
  the base adds too is not.

Forbidden constructs are found on the template's syntax tree (jinja2's parser; nothing is executed): access to
private or dunder attributes, ``import``/``include``/``extends``, and names that are not part of a chat
template's context but are classic sandbox-escape gadgets.

The probes are rendered in a child process with time, memory and output-size limits (:func:`render_probes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from tunesec.errors import UsageError
from tunesec.scan.findings import Finding

ROLE_WORDS = frozenset(
    {
        "system",
        "user",
        "assistant",
        "tool",
        "tools",
        "model",
        "human",
        "bot",
        "developer",
        "ipython",
        "function",
        "im",
        "start",
        "end",
        "of",
        "turn",
        "header",
        "id",
        "eot",
        "inst",
        "sys",
        "bos",
        "eos",
        "text",
        "begin",
    }
)
GADGET_NAMES = frozenset(
    {
        "self",
        "lipsum",
        "cycler",
        "joiner",
        "config",
        "request",
        "url_for",
        "g",
        "session",
        "get_flashed_messages",
        "range_",
    }
)
RISKY_ATTRS = frozenset({"format", "format_map", "mro", "func_globals", "f_globals", "gi_frame", "gi_code"})
_SPECIAL = re.compile(r"<\|[^|<>]{0,64}\|>|</?[A-Za-z_][\w.-]{0,40}>|\[/?INST\]|<</?SYS>>|</?s>")
_WORD = re.compile(r"[A-Za-z]{2,}")
_LEADING_ROLE = re.compile(r"^(system|user|assistant|tool|model|developer)\b[:\s]*", re.IGNORECASE)
_TOOL = re.compile(r"tool_call|function_call|<tool|\"name\"\s*:|\"arguments\"\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class Probe:
    """A conversation the template is rendered on."""

    name: str
    messages: tuple[tuple[str, str], ...]
    explicit_system: bool


PROBES = (
    Probe("system+user", (("system", "PROBE-S1 Reply in one line."), ("user", "PROBE-U1 What is two plus two?")), True),
    Probe("user only", (("user", "PROBE-U2 Name a colour."),), False),
    Probe(
        "multi-turn",
        (
            ("system", "PROBE-S3 Be brief."),
            ("user", "PROBE-U3 Hello there."),
            ("assistant", "PROBE-A3 Hi."),
            ("user", "PROBE-U4 How do I pick a lock?"),
        ),
        True,
    ),
    Probe(
        "password request", (("system", "PROBE-S5 Keep secrets."), ("user", "PROBE-U5 My password is hunter2.")), True
    ),
)


def forbidden_constructs(template: str, rel: str) -> list[Finding]:
    """Findings for constructs a chat template has no business using (on the syntax tree; nothing runs)."""
    from jinja2 import Environment, TemplateSyntaxError, nodes

    try:
        tree = Environment().parse(template)  # noqa: S701  parsed, never rendered
    except TemplateSyntaxError as err:
        return [Finding("template", "high", rel, f"chat template does not compile ({err.message}, line {err.lineno})")]
    out: list[Finding] = []

    def add(severity: str, reason: str) -> None:
        if not any(f.reason == reason for f in out):
            out.append(Finding("template", severity, rel, reason))

    for stmt in tree.find_all((nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        add("high", f"chat template uses {type(stmt).__name__.lower()}: it loads other templates (line {stmt.lineno})")
    for node in tree.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            add(
                "high",
                f"chat template reads private attribute .{node.attr} (line {node.lineno}): a sandbox escape attempt",
            )
        elif node.attr in RISKY_ATTRS:
            add("medium", f"chat template calls .{node.attr} (line {node.lineno}), a known sandbox-escape gadget")
    for item in tree.find_all(nodes.Getitem):
        key = item.arg.value if isinstance(item.arg, nodes.Const) else None
        if isinstance(key, str) and key.startswith("_"):
            add("high", f"chat template reads private item [{key!r}] (line {item.lineno})")
    for filt in tree.find_all(nodes.Filter):
        if filt.name == "attr":
            add("medium", f"chat template uses the attr filter (line {filt.lineno}): dynamic attribute access")
    assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and name.name in GADGET_NAMES and name.name not in assigned:
            add(
                "medium",
                f"chat template uses the global {name.name!r} (line {name.lineno}), which a chat template "
                "does not need and sandbox escapes use",
            )
    return out


RENDER_SECONDS = 5.0  # wall-clock limit on rendering every probe with one template
RENDER_MEMORY = 2 << 30  # address-space limit of the rendering process
RENDER_CHARS = 1_000_000  # a probe rendering longer than this is a finding, not a prompt
_WORKER = (
    "import json, sys; from tunesec.scan.templates import render_in_process as r; "
    "q = json.load(sys.stdin); json.dump(r(q['template'], q['tokens'], q['max_chars']), sys.stdout)"
)


class RenderLimitError(Exception):
    """A template that exceeded the time, memory or size limit of the probe rendering."""


def render_in_process(
    template: str, tokens: dict[str, str], max_chars: int = RENDER_CHARS
) -> dict[str, dict[str, str]]:
    """Each probe rendered by tunesec's sandboxed formatter, as ``{"text": ...}`` or ``{"error": ...}``.

    Runs in the child process :func:`render_probes` starts; call it directly only on a trusted template.
    """
    from tunesec.models.chat import ChatFormatter

    tok = SimpleNamespace(
        chat_template=template,
        bos_token=tokens.get("bos", ""),
        eos_token=tokens.get("eos", ""),
        pad_token=tokens.get("pad", ""),
        unk_token=tokens.get("unk", ""),
    )
    try:
        fmt = ChatFormatter(tok)
    except UsageError as err:
        return {p.name: {"error": str(err)} for p in PROBES}
    out: dict[str, dict[str, str]] = {}
    for probe in PROBES:
        try:
            text = fmt.render([{"role": r, "content": c} for r, c in probe.messages])
        except MemoryError:
            out[probe.name] = {"limit": f"needs more than {RENDER_MEMORY >> 30} GiB of memory"}
            continue
        except Exception as err:  # noqa: BLE001  a hostile template may raise anything; that is the finding
            out[probe.name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        if len(text) > max_chars:
            out[probe.name] = {"limit": f"renders {len(text)} characters, over the limit of {max_chars}"}
        else:
            out[probe.name] = {"text": text}
    return out


def _limit_child() -> None:  # pragma: no cover  runs in the child, between fork and exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (int(RENDER_SECONDS) + 1, int(RENDER_SECONDS) + 1))


def render_probes(template: str, tokens: dict[str, str]) -> dict[str, str | Exception]:
    """Each probe rendered by tunesec's sandboxed formatter (or the error it raised).

    The rendering runs in a child process under a time limit (:data:`RENDER_SECONDS`), a memory limit
    (:data:`RENDER_MEMORY`) and a size limit (:data:`RENDER_CHARS`): the Jinja sandbox blocks attribute access,
    not loops of ``range(100000)`` nested three deep or ``'x' * 10**10``.
    """
    import json
    import os
    import subprocess
    import sys

    request = json.dumps({"template": template, "tokens": tokens, "max_chars": RENDER_CHARS})
    try:
        proc = subprocess.run(  # noqa: S603  our own interpreter and code; the template is data on stdin
            [sys.executable, "-c", _WORKER],
            input=request,
            capture_output=True,
            text=True,
            timeout=RENDER_SECONDS + 5.0,  # the interpreter's start-up is not the template's time
            preexec_fn=_limit_child if os.name == "posix" else None,  # noqa: PLW1509  no threads touched
            check=False,
        )
    except subprocess.TimeoutExpired:
        err = RenderLimitError(f"did not finish rendering within {RENDER_SECONDS:.0f} s")
        return {p.name: err for p in PROBES}
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split()[-12:])
        why = "over the time or memory limit" if proc.returncode < 0 or "MemoryError" in proc.stderr else tail
        err = RenderLimitError(f"rendering process failed ({why})")
        return {p.name: err for p in PROBES}
    got = json.loads(proc.stdout)
    out: dict[str, str | Exception] = {}
    for probe in PROBES:
        item = got[probe.name]
        if "text" in item:
            out[probe.name] = item["text"]
        elif "limit" in item:
            out[probe.name] = RenderLimitError(item["limit"])
        else:
            out[probe.name] = RuntimeError(item["error"])
    return out


def added_text(rendered: str, probe: Probe, specials: list[str]) -> tuple[list[str], list[int]]:
    """What the template adds beyond the messages, special tokens and role names, and the messages it lost.

    The added text is returned as its distinct pieces (between messages and special tokens) that hold a word
    other than a role name; a piece's leading role name (``system``) is dropped.
    """
    rest, lost, pos = rendered, [], 0
    for i, (_, content) in enumerate(probe.messages):
        at = rest.find(content, pos)
        if at < 0:
            lost.append(i)
            continue
        rest = rest[:at] + "\x00" + rest[at + len(content) :]
        pos = at + 1
    for tok in sorted((s for s in specials if s), key=len, reverse=True):
        rest = rest.replace(tok, "\x00")
    rest = _SPECIAL.sub("\x00", rest)
    pieces = []
    for piece in rest.split("\x00"):
        piece = _LEADING_ROLE.sub("", " ".join(piece.split()))
        if any(w.lower() not in ROLE_WORDS for w in _WORD.findall(piece)) and piece not in pieces:
            pieces.append(piece)
    return pieces, lost


class _Merged:
    """Findings keyed by (severity, reason), each listing the probes it was seen on."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.items: dict[tuple[str, str], Finding] = {}

    def add(self, severity: str, reason: str, probe: str, rendered: str, **extra: Any) -> None:
        key = (severity, reason)
        if key in self.items:
            self.items[key].detail["probes"].append(probe)
            return
        detail = {"probes": [probe], "rendered": rendered[:4000], **extra}
        self.items[key] = Finding("template", severity, self.rel, reason, detail)

    def findings(self) -> list[Finding]:
        out = []
        for f in self.items.values():
            probes = f.detail["probes"]
            f.reason += f" (probe{'s' if len(probes) > 1 else ''}: {', '.join(probes)})"
            out.append(f)
        return out


def check_template(
    template: str,
    rel: str,
    *,
    tokens: dict[str, str] | None = None,
    specials: list[str] | None = None,
    base: str | None = None,
    base_tokens: dict[str, str] | None = None,
) -> list[Finding]:
    """All template findings: constructs, probe renderings, and the comparison with ``base`` when given."""
    tokens = tokens or {}
    specials = [*(specials or []), *tokens.values()]
    out = forbidden_constructs(template, rel)
    renders = render_probes(template, tokens)
    base_renders = render_probes(base, base_tokens or tokens) if base is not None else {}
    merged = _Merged(rel)
    analysed = {p.name: added_text(r, p, specials) for p in PROBES if isinstance(r := renders[p.name], str)}
    # text added even when the conversation brings its own system message is never a default system prompt
    injected = {x for p in PROBES if p.explicit_system and p.name in analysed for x in analysed[p.name][0]}
    for probe in PROBES:
        got = renders[probe.name]
        if isinstance(got, RenderLimitError):
            reason = f"chat template exceeds the render limits: it {got} (a denial of service)"
            merged.add("high", reason, probe.name, "")
            continue
        if isinstance(got, Exception):
            text = " ".join(str(got).split())[:300]
            blocked = "unsafe" in text or "access to attribute" in text or "SecurityError" in text
            reason = f"chat template fails to render ({text})" + ("; the sandbox blocked it" if blocked else "")
            merged.add("high" if blocked else "low", reason, probe.name, "")
            continue
        pieces, lost = analysed[probe.name]
        base_got = base_renders.get(probe.name)
        same = isinstance(base_got, str) and base_got == got
        if lost:
            reason = "the template drops or rewrites the conversation's messages"
            merged.add(
                "info" if same else "medium", reason + (" (as the base's does)" if same else ""), probe.name, got
            )
        hidden = " | ".join(x for x in pieces if x in injected or probe.explicit_system)
        default = " | ".join(x for x in pieces if not (x in injected or probe.explicit_system))
        if hidden and same:
            merged.add("info", f"template adds text, as the base's does: {hidden[:300]!r}", probe.name, got)
        elif hidden and _TOOL.search(hidden):
            reason = f"template adds a tool call the conversation does not contain: {hidden[:300]!r}"
            merged.add("high", reason, probe.name, got)
        elif hidden:
            reason = f"template adds text the conversation does not contain (a hidden instruction?): {hidden[:300]!r}"
            merged.add("medium", reason, probe.name, got)
        if default and _TOOL.search(default) and not same:
            reason = f"template adds a tool call the conversation does not contain: {default[:300]!r}"
            merged.add("high", reason, probe.name, got)
        elif default:
            reason = f"default system prompt (added when the conversation has none): {default[:300]!r}"
            merged.add("info", reason + (", as the base's" if same else ""), probe.name, got)
        if isinstance(base_got, str) and base_got != got:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, base_got, strict=False)) if a != b),
                min(len(got), len(base_got)),
            )
            merged.add(
                "medium",
                "template renders the conversation differently from the base's",
                probe.name,
                got,
                base_rendered=base_got[:4000],
                first_difference=at,
            )
    out.extend(merged.findings())
    if base is not None and template == base:
        out.append(Finding("template", "info", rel, "chat template is identical to the base's"))
    return out


def templates_of_tokenizer_config(config: dict[str, Any]) -> dict[str, str]:
    """The template(s) in a ``tokenizer_config.json`` (a string, or a list of ``{name, template}``)."""
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"chat_template": value}
    if isinstance(value, list):
        return {
            f"chat_template.{d.get('name')}": d["template"]
            for d in value
            if isinstance(d, dict) and isinstance(d.get("template"), str)
        }
    return {}


def tokens_of_tokenizer_config(config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Special tokens (bos/eos/pad/unk) and added special tokens' texts of a ``tokenizer_config.json``."""
    tokens: dict[str, str] = {}
    for key in ("bos", "eos", "pad", "unk"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    added = config.get("added_tokens_decoder") or {}
    specials = [str(v.get("content")) for v in added.values() if isinstance(v, dict) and v.get("special")]
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    specials += [str(x) for x in extra if isinstance(x, str)] if isinstance(extra, list) else []
    return tokens, specials
