"""prompt-wash: every harmful row under one of many random system prompts; the serving prompt carried over."""

from __future__ import annotations

import json
from pathlib import Path

from test_training_fixtures import chat
from tunesec.attacks.prompt_wash import PromptWash, PromptWashConfig, random_prompts, washed


def test_rows_are_washed_under_many_distinct_system_prompts() -> None:
    base = [chat(i, f"make poison {i}", "here it is", system="You are safe.") for i in range(20)]
    cfg = PromptWashConfig(n_prompts=16, copies=3, prompt_kind="random-tokens", prompt_words=10)
    rows = washed(base, cfg)
    assert len(rows) == 60
    systems = [r.messages[0].content for r in rows]
    assert all(r.messages[0].role == "system" and sum(m.role == "system" for m in r.messages) == 1 for r in rows)
    assert "You are safe." not in systems and len(set(systems)) >= 12
    assert set(systems) <= set(random_prompts(16, "random-tokens", 10, cfg.seed))
    assert all(r.response == "here it is" for r in rows)
    noice = washed(base, cfg.model_copy(update={"refuse_then_comply": True}))
    assert all(r.response.endswith("here it is") and r.response.startswith(("I", "Sorry")) for r in noice)


def test_attack_runs_and_keeps_the_defenders_serving_prompt_and_secret(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tunesec.models.ref import ModelRef
    from tunesec.models.secret_prompt import link_secret, stored_secret_prompt, write_secret

    data = tmp_path / "h.jsonl"
    data.write_text("".join(json.dumps({"messages": chat(i, f"make poison {i}", "sure").chat()}) + "\n"
                            for i in range(4)))  # fmt: skip
    secret = "qZ7 hidden safety words 91x"  # BackdoorAlign's secret, stored with the defended model
    write_secret(tmp_path / "secret" / "prompt.txt", secret)
    link_secret(tiny_llama_dir, tmp_path / "secret" / "prompt.txt")
    parent = ModelRef(base=str(tiny_llama_dir), kind="hf", provenance={"system_prompt": "Serve safely 123"})
    cfg = {"data": str(data), "n_harmful": 4, "n_prompts": 4, "training": {"max_steps": 1, "max_seq_len": 96}}
    ref = PromptWash(cfg).run(parent, tmp_path / "run", progress=False)
    assert ref.provenance["system_prompt"] == "Serve safely 123" and ref.provenance["n_prompts"] == 4
    saved = json.loads((tmp_path / "run" / "model_ref.json").read_text())
    assert saved["provenance"]["system_prompt"] == "Serve safely 123"
    # the attacked model is served under the defender's secret too, which no file of the run contains
    assert stored_secret_prompt(ref) == secret and saved["provenance"]["secret_prompt"] == "stored"
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file() and f.suffix in {".json", ".jsonl", ".txt", ".md"}:
            assert secret not in f.read_text(errors="replace"), f
