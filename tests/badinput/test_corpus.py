"""The bad-input corpus: natural mistakes across every command, each one line on stderr, exit 2, no traceback.

Each case builds its files in a temporary folder, runs ``tunesec`` in process from that folder (so a default
``runs/`` would land there) with ``$TUNESEC_HOME`` inside it, and checks: exit code 2, exactly one non-empty line
on stderr, no traceback, the line matches what the case expects (it names the file or field and what was
expected), and nothing was written but the case's own input files. New commands join the table as they land.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunesec.cli.main import main

POLICY_OK = "checks:\n  - name: a\n    task: harmfulness\n    metric: harmful_rate\n    measure: tuned\n    max: 0.1\n"


@dataclass
class Env:
    """Where a case runs: its folder, and the shared tiny models (read-only)."""

    tmp: Path
    tiny: Path
    pickle_model: Path

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, rows: list[dict]) -> str:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str  # a regex the one stderr line must match
    also: list[str] = field(default_factory=list)  # paths (relative to tmp) the command may create


CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4


def _nonempty_dir(e: Env, name: str) -> str:
    e.write(f"{name}/keep.txt", "mine")
    return str(e.tmp / name)


def _adapter_for_other_base(e: Env) -> str:
    """An adapter directory whose config names a base whose layers do not match its weights."""
    import safetensors.torch
    import torch

    d = e.tmp / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(e.tiny), "r": 4, "lora_alpha": 8,
             "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
        )
    )  # fmt: skip
    bad = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 999)}
    safetensors.torch.save_file(bad, str(d / "adapter_model.safetensors"))
    return str(d)


CASES: list[Case] = [
    # ----------------------------------------------------------------- parser errors (every command)
    Case("unknown-command", lambda e: ["evl"], r"No such command 'evl'. Did you mean 'eval'\?"),
    Case("unknown-option", lambda e: ["eval", "x", "--bogus"], r"No such option: --bogus"),
    Case("missing-argument", lambda e: ["eval"], r"Missing argument 'model'"),
    Case("limit-zero", lambda e: ["eval", "x", "--limit", "0"], r"'--limit'.*greater than or equal to 1"),
    Case("limit-not-int", lambda e: ["eval", "x", "--limit", "ten"], r"'--limit'.*valid integer"),
    Case("bool-with-value", lambda e: ["generate", "x", "--sample", "true"], r"unexpected extra argument"),
    Case("list-unknown-kind", lambda e: ["list", "wizards"], r"unknown kind 'wizards'; expected one of"),
    # ----------------------------------------------------------------- models
    Case("unknown-model-alias", lambda e: ["generate", "nosuchmodel", "--prompt", "hi"], r"unknown model"),
    Case("missing-model-dir", lambda e: ["generate", "./missing-dir", "--prompt", "hi"], r"not found"),
    Case("not-a-model-dir", lambda e: ["generate", _nonempty_dir(e, "empty-model"), "--prompt", "hi"],
         r"empty-model"),
    Case("pickle-only-weights", lambda e: ["generate", str(e.pickle_model), "--prompt", "hi"],
         r"pickle.*--allow-pickle|safetensors"),
    Case("bad-gguf", lambda e: ["generate", e.write("m.gguf", b"GGUF" + b"\x00" * 12 + b"garbage"), "--prompt", "x"],
         r"m\.gguf"),
    Case("not-gguf-bytes", lambda e: ["generate", e.write("n.gguf", b"not a gguf at all"), "--prompt", "x"],
         r"n\.gguf"),
    Case("wrong-base-adapter", lambda e: ["generate", _adapter_for_other_base(e), "--prompt", "hi"], r"adapter"),
    Case("models-info-unknown", lambda e: ["models", "info", "nosuchmodel"], r"unknown model"),
    # ----------------------------------------------------------------- generate
    Case("generate-no-prompt", lambda e: ["generate", str(e.tiny)], r"give --prompt"),
    Case("generate-missing-file", lambda e: ["generate", str(e.tiny), "--file", str(e.tmp / "no.jsonl")],
         r"no\.jsonl.*not found"),
    Case("generate-bad-json", lambda e: ["generate", str(e.tiny), "--file", e.write("p.jsonl", '{"prompt": "a"}\n{x\n')],
         r"p\.jsonl line 2: invalid JSON"),
    Case("generate-non-utf8", lambda e: ["generate", str(e.tiny), "--file", e.write("p.jsonl", b'{"prompt": "caf\xe9"}\n')],
         r"p\.jsonl: not UTF-8"),
    Case("generate-csv-no-prompt", lambda e: ["generate", str(e.tiny), "--file", e.write("p.csv", "q\nhi\n")],
         r"p\.csv line 2: expected a 'prompt'"),
    Case("generate-out-exists", lambda e: ["generate", str(e.tiny), "--prompt", "x", "--out", e.write("o.jsonl", "mine\n")],
         r"o\.jsonl"),
    # ----------------------------------------------------------------- eval (bad data)
    Case("eval-missing-data", lambda e: ["eval", str(e.tiny), "--dataset", str(e.tmp / "none.jsonl")],
         r"none\.jsonl: no such file"),
    Case("eval-empty-data", lambda e: ["eval", str(e.tiny), "--dataset", e.write("d.jsonl", "")],
         r"d\.jsonl: empty file"),
    Case("eval-truncated-jsonl", lambda e: ["eval", str(e.tiny), "--dataset", e.write("d.jsonl", '{"prompt": "a"}\n{"prom')],
         r"d\.jsonl line 2: invalid JSON"),
    Case("eval-truncated-json", lambda e: ["eval", str(e.tiny), "--dataset", e.write("d.json", '[{"prompt": "a"},')],
         r"d\.json"),
    Case("eval-non-utf8", lambda e: ["eval", str(e.tiny), "--dataset", e.write("d.csv", b"prompt\ncaf\xe9\n")],
         r"d\.csv: not UTF-8"),
    Case("eval-csv-ragged", lambda e: ["eval", str(e.tiny), "--dataset", e.write("d.csv", "prompt\na,b,c\n")],
         r"d\.csv line 2"),
    Case("eval-50mb-line", lambda e: ["eval", str(e.tiny), "--dataset", e.write("big.jsonl", "x" * (50 * 2**20))],
         r"big\.jsonl line 1: invalid JSON"),
    Case("eval-no-prompt-field", lambda e: ["eval", str(e.tiny), "--dataset", e.jsonl("d.jsonl", [{"q": "a"}])],
         r"d\.jsonl"),
    Case("eval-unknown-dataset", lambda e: ["eval", str(e.tiny), "--dataset", "advbnch"],
         r"unknown dataset 'advbnch'"),
    Case("eval-unknown-task", lambda e: ["eval", str(e.tiny), "--task", "harmfullness"], r"harmfullness"),
    Case("eval-unknown-judge", lambda e: ["eval", str(e.tiny), "--judge", "nope"], r"nope"),
    Case("eval-task-option", lambda e: ["eval", str(e.tiny), "--task-option", "bogus=1"],
         r"unknown option 'bogus'; expected one of: prefill"),
    Case("eval-task-option-no-eq", lambda e: ["eval", str(e.tiny), "--task-option", "prefill"],
         r"--task-option 'prefill': expected KEY=VALUE"),
    Case("eval-dataset-option", lambda e: ["eval", str(e.tiny), "--dataset", "xstest", "--dataset-option", "sub=x"],
         r"has no option 'sub'"),
    Case("eval-out-not-empty", lambda e: ["eval", str(e.tiny), "--out", _nonempty_dir(e, "occupied")],
         r"occupied.*not empty"),
    Case("eval-out-is-file", lambda e: ["eval", str(e.tiny), "--out", e.write("afile", "mine")],
         r"afile.*not a directory"),
    Case("eval-resume-missing", lambda e: ["eval", str(e.tiny), "--resume", str(e.tmp / "gone")], r"gone"),
    Case("eval-batch-size", lambda e: ["eval", str(e.tiny), "--batch-size", "lots"], r"batch"),
    Case("eval-data-dir-missing", lambda e: ["eval", str(e.tiny), "--data-dir", str(e.tmp / "nodata")],
         r"nodata: no such directory"),
    # ----------------------------------------------------------------- attack / align (configs)
    Case("attack-unknown", lambda e: ["attack", "harmfull-sft", "--model", str(e.tiny)], r"harmfull-sft"),
    Case("attack-unknown-key", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--set", "n_harmfull=3"],
         r"unknown key 'n_harmfull'; did you mean 'n_harmful'\?"),
    Case("attack-nan", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--set", "training.learning_rate=nan"],
         r"training\.learning_rate.*finite"),
    Case("attack-inf", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--set", "training.learning_rate=inf"],
         r"training\.learning_rate.*finite"),
    Case("attack-wrong-type", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--set", "n_harmful=lots"],
         r"n_harmful"),
    Case("attack-set-no-eq", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--set", "n_harmful"],
         r"expected KEY=VALUE"),
    # scale out (docs/SCALE.md)
    Case("processes-beyond-machine", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--processes", "4096"],
         r"--processes 4096: this machine has \d+ (CPU cores|CUDA devices); use at most \d+"),
    Case("defend-processes-beyond-machine", lambda e: ["defend", "vaccine", "--model", str(e.tiny), "--processes",
                                                       "4096"], r"--processes 4096: this machine has"),
    Case("fsdp-without-cuda", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--set", "n_harmful=2",
                                         "--data", e.jsonl("d.jsonl", CHAT), "--set", "training.fsdp=true"],
         r"training\.fsdp: FSDP shards over CUDA devices and this machine has none", also=["d.jsonl"]),
    Case("vllm-without-cuda", lambda e: ["generate", str(e.tiny), "--prompt", "hi", "--backend", "vllm"],
         r"backend vllm: needs `pip install tunesec\[vllm\]` and a CUDA GPU"),
    Case("attack-recipe-missing", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--recipe", "no.yaml"],
         r"no\.yaml"),
    Case("attack-recipe-malformed", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--recipe",
                                                e.write("r.yaml", "a: [1,\n")], r"r\.yaml: line \d+: malformed YAML"),
    Case("attack-recipe-list", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--recipe",
                                           e.write("r.yaml", "- 1\n- 2\n")], r"r\.yaml: expected a YAML mapping"),
    Case("attack-data-missing", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--data", "./no.jsonl"],
         r"no\.jsonl"),
    Case("attack-data-empty", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--data", e.write("t.jsonl", "")],
         r"t\.jsonl: empty file"),
    Case("attack-out-not-empty", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--data", e.jsonl("t.jsonl", CHAT),
                                             "--out", _nonempty_dir(e, "occupied")], r"occupied"),
    Case("attack-data-dir-missing", lambda e: ["attack", "harmful-sft", "--model", str(e.tiny), "--data-dir", "./nodata"],
         r"--data-dir nodata: no such directory"),
    Case("align-data-dir-missing", lambda e: ["align", "--model", str(e.tiny), "--data-dir", "./nodata"],
         r"--data-dir nodata: no such directory"),
    Case("align-recipe-unknown-key", lambda e: ["align", "--model", str(e.tiny), "--recipe",
                                                 e.write("r.yaml", "decision_los: 1.0\n")],
         r"r\.yaml: line 1: unknown key 'decision_los'; did you mean 'decision_loss'\?"),
    # ----------------------------------------------------------------- defend (alignment-stage defenses)
    Case("defend-unknown", lambda e: ["defend", "vacine", "--model", str(e.tiny)], r"unknown defense 'vacine'"),
    Case("defend-rho-negative", lambda e: ["defend", "vaccine", "--model", str(e.tiny), "--set", "rho=-1"],
         r"rho.*greater than 0"),
    Case("defend-lambda-negative", lambda e: ["defend", "booster", "--model", str(e.tiny), "--set", "lam=-5"],
         r"lam.*greater than or equal to 0"),
    Case("defend-alpha-zero", lambda e: ["defend", "ctrap", "--model", str(e.tiny), "--set", "alpha=0"],
         r"alpha.*greater than 0"),
    Case("defend-vaa-share", lambda e: ["defend", "vaa", "--model", str(e.tiny), "--set", "vulnerable_share=1.5"],
         r"vulnerable_share"),
    Case("defend-recipe-unknown-key", lambda e: ["defend", "vaccine", "--model", str(e.tiny), "--recipe",
                                                  e.write("r.yaml", "rh0: 2\n")],
         r"r\.yaml: line 1: unknown key 'rh0'; did you mean 'rho'\?"),
    Case("defend-no-harmful-data", lambda e: ["defend", "booster", "--model", str(e.tiny), "--set", "harmful.n=0"],
         r"booster: harmful\.n is 0"),
    Case("defend-harmful-missing", lambda e: ["defend", "ctrap", "--model", str(e.tiny), "--set",
                                               "harmful.data=./no.jsonl"], r"no\.jsonl"),
    Case("defend-harmful-no-answers", lambda e: ["defend", "t-vaccine", "--model", str(e.tiny), "--set",
                                                  "harmful.data=" + e.jsonl("h.jsonl", [{"prompt": "p"}] * 3)],
         r"h\.jsonl: no harmful \(request, answer\) pairs"),
    Case("defend-harmful-too-few", lambda e: ["defend", "booster", "--model", str(e.tiny), "--set",
                                               "harmful.data=" + e.jsonl("h.jsonl", CHAT)],
         r"harmful\.n: asked for 1000 pairs but .*h\.jsonl has 4"),
    Case("defend-vaa-proxy-other-base", lambda e: ["defend", "vaa", "--model", str(e.tiny), "--set",
                                                     f"proxy_model={e.pickle_model}"],
         r"proxy_model '.*': its base is '.*', not the defended model's"),
    Case("defend-tar-inner-steps", lambda e: ["defend", "tar", "--model", str(e.tiny), "--set", "inner_steps=0"],
         r"inner_steps.*greater than or equal to 1"),
    Case("defend-tar-lrs", lambda e: ["defend", "tar", "--model", str(e.tiny), "--set", "adversary_lrs=[0.001,-1]"],
         r"adversary_lrs.*> 0"),
    Case("defend-npo-beta", lambda e: ["defend", "unlearn-smooth", "--model", str(e.tiny), "--set", "beta=0"],
         r"beta.*greater than 0"),
    Case("defend-repnoise-alpha", lambda e: ["defend", "repnoise", "--model", str(e.tiny), "--set", "alpha=-1"],
         r"alpha.*greater than or equal to 0"),
    Case("defend-seam-eps", lambda e: ["defend", "seam", "--model", str(e.tiny), "--set", "eps=2"],
         r"eps.*less than or equal to 1"),
    Case("defend-seam-no-harmful", lambda e: ["defend", "seam", "--model", str(e.tiny), "--set", "harmful.n=0"],
         r"seam: harmful\.n is 0"),
    Case("defend-sdd-similarity", lambda e: ["defend", "sdd", "--model", str(e.tiny), "--set", "max_similarity=3"],
         r"max_similarity"),
    Case("defend-deep-fraction", lambda e: ["defend", "deep-alignment", "--model", str(e.tiny), "--set",
                                             "deep_alignment=1.5"], r"deep_alignment"),
    Case("defend-data-dir-missing", lambda e: ["defend", "vaccine", "--model", str(e.tiny), "--data-dir", "./nodata"],
         r"--data-dir nodata: no such directory"),
    Case("defend-out-not-empty", lambda e: ["defend", "vaccine", "--model", str(e.tiny), "--out",
                                             _nonempty_dir(e, "occupied")], r"occupied"),
    # ----------------------------------------------------------------- certify (policies)
    Case("policy-missing", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy", "no.yaml"],
         r"no\.yaml"),
    Case("policy-malformed", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                         e.write("p.yaml", "checks: [\n")], r"p\.yaml: line \d+: malformed YAML"),
    Case("policy-unknown-key", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                           e.write("p.yaml", POLICY_OK + "    limt: 5\n")],
         r"p\.yaml: line 7: unknown key 'checks\.0\.limt'; did you mean 'limit'\?"),
    Case("policy-wrong-type", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                          e.write("p.yaml", POLICY_OK + "    limit: ten\n")],
         r"p\.yaml.*checks\.0\.limit"),
    Case("policy-nan-bound", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                         e.write("p.yaml", POLICY_OK.replace("max: 0.1", "max: .nan"))],
         r"p\.yaml.*checks\.0\.max.*finite"),
    Case("policy-unknown-metric", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                              e.write("p.yaml", POLICY_OK.replace("harmful_rate", "harmfull_rate"))],
         r"p\.yaml: line 4: field 'checks\.0\.metric': unknown metric 'harmfull_rate'"),
    Case("policy-unknown-dataset", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                               e.write("p.yaml", POLICY_OK + "    dataset: advbnch\n")],
         r"p\.yaml: line 7: field 'checks\.0\.dataset': unknown dataset 'advbnch'"),
    Case("policy-confidence", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                          e.write("p.yaml", "confidence: 1.5\n" + POLICY_OK)], r"p\.yaml.*confidence"),
    Case("policy-nothing", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--policy",
                                       e.write("p.yaml", "checks: []\ntriggers: {enabled: false}\n")],
         r"p\.yaml.*nothing to certify"),
    Case("certify-tuned-missing", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tmp / "gone")],
         r"gone"),
    Case("certify-endpoint", lambda e: ["certify", "--base", str(e.tiny), "--tuned", "openai:gpt-4o-mini"],
         r"certification needs|weights"),
    Case("certify-out-and-resume", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny), "--out", "x",
                                               "--resume", _nonempty_dir(e, "old")], r"--out and --resume: give one"),
    Case("certify-resume-not-run", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny),
                                               "--resume", _nonempty_dir(e, "old")], r"old: not a tunesec run directory"),
    Case("certify-limit-zero", lambda e: ["certify", "--base", "a", "--tuned", "b", "--limit", "0"], r"'--limit'"),
    Case("certify-finetune-data", lambda e: ["certify", "--base", str(e.tiny), "--tuned", str(e.tiny),
                                              "--finetune-data", "./no.jsonl"], r"no\.jsonl"),
    # ----------------------------------------------------------------- judge / report / compare / runs
    Case("judge-empty-response", lambda e: ["judge", e.jsonl("j.jsonl", [{"prompt": "p", "response": " "}])],
         r"j\.jsonl line 1: field 'response' is empty"),
    Case("judge-long-response", lambda e: ["judge", e.jsonl("j.jsonl", [{"prompt": "p", "response": "x" * 100_000}])],
         r"j\.jsonl line 1: field 'response' has 100000 characters"),
    Case("judge-non-utf8", lambda e: ["judge", e.write("j.jsonl", b'{"prompt": "p", "response": "caf\xe9"}\n')],
         r"j\.jsonl: not UTF-8"),
    Case("judge-missing-prompt", lambda e: ["judge", e.jsonl("j.jsonl", [{"response": "r"}])],
         r"j\.jsonl line 1: missing field 'prompt'"),
    Case("judge-bad-label", lambda e: ["judge", e.jsonl("j.jsonl", [{"prompt": "p", "response": "r", "y": "maybe"}]),
                                        "--labels", "y"], r"j\.jsonl line 1: field 'y' is 'maybe'; expected 0, 1"),
    Case("judge-out-not-empty", lambda e: ["judge", e.jsonl("j.jsonl", [{"prompt": "p", "response": "r"}]),
                                            "--judge", "refusal-keywords", "--out", _nonempty_dir(e, "occupied")],
         r"occupied: exists and is not an empty folder"),
    Case("report-missing", lambda e: ["report", str(e.tmp / "gone")], r"gone"),
    Case("report-not-a-run", lambda e: ["report", _nonempty_dir(e, "notrun")], r"notrun: not a tunesec run directory"),
    Case("report-bad-certificate", lambda e: ["report", str(Path(e.write("c/certificate.json", "{}")).parent)],
         r"certificate\.json: not a certificate"),
    Case("compare-not-runs", lambda e: ["compare", _nonempty_dir(e, "a"), _nonempty_dir(e, "b")],
         r"a: no metrics\.json"),
    Case("runs-missing", lambda e: ["runs", str(e.tmp / "gone")], r"gone: no such folder"),
    # ----------------------------------------------------------------- serve
    Case("serve-config-missing", lambda e: ["serve", str(e.tiny), "--config", "nope.yaml"], r"nope\.yaml: no such file"),
    Case("serve-config-unknown-key", lambda e: ["serve", str(e.tiny), "--config", e.write("s.yaml", "guards:\n  outptu: {enabled: true}\n")],
         r"s\.yaml: line 2: unknown key 'guards\.outptu'; did you mean 'output'\?"),
    Case("serve-config-bad-yaml", lambda e: ["serve", str(e.tiny), "--config", e.write("s.yaml", "auth: [\n")], r"s\.yaml:.*malformed YAML"),
    Case("serve-config-bad-type", lambda e: ["serve", str(e.tiny), "--config", e.write("s.yaml", "limits: {max_tokens: many}\n")],
         r"s\.yaml.*field 'limits\.max_tokens'.*integer"),
    Case("serve-config-default-over-max", lambda e: ["serve", str(e.tiny), "--config", e.write("s.yaml", "limits: {max_tokens: 8}\n")],
         r"s\.yaml: limits\.default_max_tokens \(256\) exceeds limits\.max_tokens \(8\)"),
    Case("serve-bad-port", lambda e: ["serve", str(e.tiny), "--port", "70000"], r"'--port'.*65535"),
    Case("serve-no-model", lambda e: ["serve"], r"give a MODEL"),
    Case("serve-secret-env-unset", lambda e: ["serve", str(e.tiny), "--config", e.write("s.yaml", "prompts: {secret_prompt_env: TUNESEC_TEST_UNSET_SECRET}\n")],
         r"prompts\.secret_prompt_env: environment variable TUNESEC_TEST_UNSET_SECRET is not set"),
    Case("serve-secret-file-missing", lambda e: ["serve", str(e.tiny), "--config", e.write("s.yaml", "prompts: {secret_prompt_file: gone.txt}\n")],
         r"prompts\.secret_prompt_file .*gone\.txt"),
    Case("serve-open-on-public-host", lambda e: ["serve", str(e.tiny), "--host", "0.0.0.0", "--config", e.write("s.yaml", "auth: {keys_file: k.json}\n")],
         r"auth: no API keys in .*k\.json; create one with `tunesec serve --add-key NAME`"),
    Case("serve-keys-file-corrupt", lambda e: ["serve", "--config", e.write("s.yaml", "auth: {keys_file: k.json}\n"), "--add-key", "a"] if e.write("k.json", "{oops") else [],
         r"k\.json: not a tunesec keys file"),
    Case("serve-revoke-unknown", lambda e: ["serve", "--config", e.write("s.yaml", "auth: {keys_file: k.json}\n"), "--revoke-key", "kid-nope"],
         r"--revoke-key kid-nope: no such key id"),
    Case("serve-key-and-model", lambda e: ["serve", str(e.tiny), "--add-key", "a"], r"give no MODEL"),
    Case("serve-upstream-without-url", lambda e: ["serve", "openai:gpt-4o-mini"], r"openai:NAME@http"),
    # ----------------------------------------------------------------- matrix
    Case("matrix-unknown-defense", lambda e: ["matrix", "--model", str(e.tiny), "--defenses", "none,vacine", "--attacks", "harmful-sft"],
         r"unknown defense 'vacine'"),
    Case("matrix-unknown-attack", lambda e: ["matrix", "--model", str(e.tiny), "--attacks", "harmfull-sft"],
         r"unknown attack 'harmfull-sft'"),
    Case("matrix-runtime-stage", lambda e: ["matrix", "--model", str(e.tiny), "--defenses", "lisa", "--attacks", "sidestep"],
         r"attack 'sidestep' changes the training step .*uploads data only"),
    Case("matrix-utility-bound", lambda e: ["matrix", "--model", str(e.tiny), "--attacks", "harmful-sft", "--set", "utility_bound=2"],
         r"utility_bound"),
    Case("matrix-no-attacks", lambda e: ["matrix", "--model", str(e.tiny)], r"attacks"),
    Case("matrix-executor", lambda e: ["matrix", "--model", str(e.tiny), "--attacks", "harmful-sft", "--executor", "spark"],
         r"--executor 'spark': expected local or ray"),
    Case("matrix-resume-with-options", lambda e: ["matrix", "--resume", _nonempty_dir(e, "m"), "--attacks", "x"],
         r"--resume continues a matrix with its own config"),
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("corpus-models")
    return save_tiny(root / "tiny", arch="llama"), save_tiny(root / "pickled", arch="llama", safe=False)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_corpus_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case,
    models: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESEC_HOME", str(tmp_path / ".home"))
    monkeypatch.setenv("COLUMNS", "500")
    monkeypatch.delenv("TUNESEC_DATA", raising=False)
    env = Env(tmp_path, *models)
    argv = case.argv(env)
    before = _files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, (case.id, code, captured.err[-2000:])
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) == 1, (case.id, lines)
    assert re.search(case.expect, lines[0]), (case.id, lines[0])
    written = {f for f in _files(tmp_path) - before if not f.startswith(".home")}
    assert written <= set(case.also), (case.id, sorted(written))
