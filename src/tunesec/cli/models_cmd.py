"""``tunesec models list|pull|info`` and ``tunesec generate``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunesec.cli.common import console, err_console
from tunesec.errors import UsageError

models_app = typer.Typer(help="Model aliases, the local cache and model facts.", no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """List model aliases and whether each is already in the local cache ($TUNESEC_HOME)."""
    from rich.table import Table

    from tunesec.models.aliases import CONVERTED_MARKER
    from tunesec.paths import tunesec_home
    from tunesec.registry import registry

    table = Table(title="model aliases")
    for col in ("alias", "description", "params", "license", "cached"):
        table.add_column(col)
    for e in registry.entries("model"):
        where = e.metadata.get("cache_dir")
        cached = "-" if where is None else ("yes" if (tunesec_home() / where / CONVERTED_MARKER).is_file() else "no")
        meta = e.metadata
        table.add_row(e.name, e.description, str(meta.get("params", "")), str(meta.get("license", "")), cached)
    console.print(table)


@models_app.command("pull")
def models_pull(
    alias: str = typer.Argument(..., help="Alias to materialise in the cache, e.g. smollm2-135m."),
) -> None:
    """Prepare an alias in the cache (convert the embedded GGUF to safetensors once)."""
    from tunesec.models.loading import resolve_alias
    from tunesec.models.ref import ModelRef

    ref = ModelRef.parse(alias)
    if ref.kind != "alias":
        raise UsageError(f"{alias}: not an alias; `tunesec models list` shows them")
    concrete = resolve_alias(ref)
    console.print(f"{alias} ready at {concrete.base}" + (f" + adapter {concrete.adapter}" if concrete.adapter else ""))


@models_app.command("info")
def models_info(
    model: str = typer.Argument(..., help="Alias, local directory, .gguf file, adapter directory or hub id."),
    hashes: bool = typer.Option(False, "--hashes", help="Also print the sha256 of the weight files."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle weight files."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run model code from the hub."),
) -> None:
    """Load a model and print its architecture, size, tokenizer and chat template facts."""
    from tunesec.models import load_model
    from tunesec.models.chat import ChatFormatter
    from tunesec.models.loading import resolve_alias

    lm = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    m, tok = lm.model, lm.tokenizer
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    conf = m.config
    info = {
        "ref": lm.ref.spec(),
        "resolved": resolve_alias(lm.ref).spec(),
        "architecture": (getattr(conf, "architectures", None) or [type(m).__name__])[0],
        "model_type": getattr(conf, "model_type", None),
        "parameters": total,
        "trainable_parameters": trainable,
        "layers": getattr(conf, "num_hidden_layers", None),
        "hidden_size": getattr(conf, "hidden_size", None),
        "vocab_size": getattr(conf, "vocab_size", None),
        "dtype": str(next(m.parameters()).dtype),
        "eos_token": tok.eos_token,
        "chat_template": "fallback (ChatML)" if ChatFormatter(tok).uses_fallback else "model's own",
    }
    if hashes:
        from tunesec.models.fingerprint import weight_hashes

        concrete = resolve_alias(lm.ref)
        if Path(concrete.base).exists():
            base = weight_hashes(concrete.base)
            if base is not None:
                info["weights_sha256"], info["weights_files"] = base["sha256"], base["files"]
        if concrete.adapter:
            adapter = weight_hashes(concrete.adapter)
            if adapter is not None:
                info["adapter_sha256"], info["adapter_files"] = adapter["sha256"], adapter["files"]
    console.print_json(json.dumps(info, default=str))


def _read_prompts(path: Path) -> list[list[dict[str, str]] | str]:
    """Prompts from a .txt file (one per line) or any record file tunesec reads.

    Records (JSONL, JSON, CSV, TSV, parquet) need a ``prompt`` (or ``goal``/``instruction``/``text``) field or a
    ``messages`` chat.
    """
    from tunesec.data.readers import read_records

    if not path.is_file():
        raise UsageError(f"{path}: prompts file not found")
    prompts: list[list[dict[str, str]] | str] = []
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        prompts = [ln for ln in text.splitlines() if ln.strip()]
    else:
        name, records = read_records(path)
        for rec in records:
            obj = rec.data
            if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                msgs = [m for m in obj["messages"] if isinstance(m, dict) and m.get("role") != "assistant"]
                prompts.append([{"role": str(m.get("role")), "content": str(m.get("content"))} for m in msgs])
                continue
            key = next(
                (k for k in ("prompt", "goal", "instruction", "text") if isinstance(obj, dict) and k in obj),
                None,
            )
            if key is None:
                raise UsageError(
                    f"{name} {rec.where}: expected a 'prompt' (or goal/instruction/text) or 'messages' field"
                )
            prompts.append(str(obj[key]))
    if not prompts:
        raise UsageError(f"{path}: no prompts found")
    return prompts


def generate(
    model: str = typer.Argument(
        ..., help="Alias, local directory, .gguf file, adapter directory, hub id, openai:NAME."
    ),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    file: Path = typer.Option(
        None,
        "--file",
        "-f",
        help="Prompts: .txt (one per line), or .jsonl/.json/.csv/.tsv/.parquet (prompt or messages).",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Write JSONL results here (must not exist)."),
    max_new_tokens: int = typer.Option(256, help="Tokens to generate at most."),
    batch_size: str = typer.Option("auto", help="Prompts per batch, or 'auto'."),
    system: str = typer.Option(None, "--system", help="System prompt for chats without one."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, help="Sampling seed."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle weight files."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run model code from the hub."),
    backend: str = typer.Option(
        "auto", "--backend", help="Engine: auto (vLLM when installed and a CUDA GPU is present, else hf), hf or vllm."
    ),
) -> None:
    """Generate responses with the batched engine; prints them, or writes JSONL with --out."""
    from tunesec.config import validate
    from tunesec.models import GenerationConfig, get_generator

    prompts: list[list[dict[str, str]] | str] = list(prompt or [])
    if file is not None:
        prompts += _read_prompts(file)
    if not prompts:
        raise UsageError("generate: give --prompt TEXT or --file PROMPTS")
    if out is not None and out.exists():
        raise UsageError(f"{out}: exists; choose a new --out (tunesec never overwrites a file)")
    bs: int | str = batch_size if batch_size == "auto" else _int_option("--batch-size", batch_size)
    cfg = validate(
        GenerationConfig,
        {
            "max_new_tokens": max_new_tokens,
            "batch_size": bs,
            "system_prompt": system,
            "do_sample": sample,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        },
        "generate options",
    )
    gen = get_generator(model, backend=backend, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    results = gen.generate(prompts, cfg)
    if out is not None:
        from tunesec.store.atomic import write_new_file

        lines = [
            json.dumps({"prompt": p, **r.model_dump()}, ensure_ascii=False)
            for p, r in zip(prompts, results, strict=True)
        ]
        write_new_file(out, ("\n".join(lines) + "\n").encode("utf-8"))
        err_console.print(f"wrote {len(results)} generations to {out}")
        return
    for p, r in zip(prompts, results, strict=True):
        shown = p if isinstance(p, str) else p[-1]["content"]
        console.rule(style="dim")
        console.print(f"> {shown}", style="bold", markup=False, highlight=False)
        console.print(r.text, markup=False, highlight=False)
        console.print(f"[dim]{r.completion_tokens} tokens, {r.finish_reason}, {r.seconds:.1f}s[/]")


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}: expected an integer or 'auto', got {value!r}") from None
