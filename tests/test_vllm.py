"""The vLLM path on a CPU: ``VLLMGenerator`` and ``get_generator``'s choice, with a fake ``vllm`` module.

The fake ``vllm.LLM`` runs the tiny model itself and honours exactly what it is given: token-id prompts
(``{"prompt_token_ids": ...}``), and per prompt ``SamplingParams`` with vLLM's meaning (temperature 0 is greedy;
``top_k`` -1 or 0 is off; a request's own ``seed`` seeds its sampler; ``stop_token_ids`` end a sequence and
``max_tokens`` caps it; ``skip_special_tokens`` leaves special tokens out of the text). The fake ``SamplingParams``
accepts only the keyword arguments vLLM's documented ``SamplingParams`` has (docs.vllm.ai, "Sampling Parameters"),
so a misspelt or unknown field fails here too. Its sampler draws like the local engine's per-prompt stream, so
with the seeds ``VLLMGenerator`` passes (one per prompt, as the local engine derives them) both engines give the
same samples: the test checks that what reaches vLLM carries every setting the local engine uses.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tunesec.errors import UsageError
from tunesec.models import GenerationConfig, get_generator, load_model

# The fields of vllm.SamplingParams that tunesec may pass (a subset of the documented ones).
SAMPLING_FIELDS = {
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens",
    "skip_special_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
}  # fmt: skip


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.n = kwargs.get("n", 1)
        self.temperature = kwargs.get("temperature", 1.0)
        self.top_p = kwargs.get("top_p", 1.0)
        self.top_k = kwargs.get("top_k", 0)
        self.seed = kwargs.get("seed")
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.stop_token_ids = list(kwargs.get("stop_token_ids") or [])
        self.skip_special_tokens = kwargs.get("skip_special_tokens", True)


class FakeLLM:
    """Decodes one prompt at a time with the model's own forward (no KV cache), as vLLM's semantics say."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, tokenizer: str, **engine_args: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.engine_args = engine_args
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.calls: list[tuple[list[Any], list[FakeSamplingParams]]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[Any], params: Any, use_tqdm: bool = True) -> list[Any]:
        import torch

        plist = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append((prompts, plist))
        outs = []
        for prompt, p in zip(prompts, plist, strict=True):
            assert isinstance(prompt, dict), "prompts go to vLLM as token ids, not text it would tokenize again"
            ids = list(prompt["prompt_token_ids"])
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            new: list[int] = []
            reason = "length"
            for _ in range(p.max_tokens):
                with torch.no_grad():
                    logits = self.model(torch.tensor([ids + new])).logits[0, -1].float()
                tok = self._pick(logits, p, gen)
                new.append(tok)
                if tok in p.stop_token_ids:
                    reason = "stop"
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=p.skip_special_tokens)
            comp = types.SimpleNamespace(text=text, token_ids=new, finish_reason=reason)
            outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[comp]))
        return outs

    @staticmethod
    def _pick(logits: Any, p: FakeSamplingParams, gen: Any) -> int:
        import torch

        if p.temperature < 1e-5:
            return int(logits.argmax())
        x = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, sorted_i = torch.sort(probs, descending=True)
            cut = sorted_p.cumsum(0) - sorted_p > p.top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter(0, sorted_i, sorted_p)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=gen)[0])


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A ``vllm`` module with the fake engine, and CUDA reported present (what the selection checks)."""
    import torch

    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM = FakeLLM  # type: ignore[attr-defined]
    mod.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeLLM.instances.clear()
    return mod


PROMPTS = [
    "Write a poem about the sea.",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}],
    "How do I kill a Python process?",
    [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello, here is"}],
]


def _hf(tiny: Path) -> Any:
    from tunesec.models import ModelRef
    from tunesec.models.generation import HFGenerator

    return HFGenerator(load_model(ModelRef.parse(str(tiny)), device="cpu"))


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(max_new_tokens=12, batch_size=4),
        GenerationConfig(max_new_tokens=16, batch_size=4, do_sample=True, temperature=0.9, top_p=0.9, top_k=20, seed=7),
        GenerationConfig(max_new_tokens=6, batch_size=4, do_sample=True, seed=3, system_prompt="Be brief."),
        GenerationConfig(max_new_tokens=8, batch_size=4, continue_final_message=True),
    ],
    ids=["greedy", "top-p-top-k", "plain-sampling", "prefill"],
)
def test_vllm_matches_hf_engine(tiny_llama_dir: Path, fake_vllm: Any, cfg: GenerationConfig) -> None:
    gen = get_generator(str(tiny_llama_dir))
    from tunesec.models.generation import HFGenerator, VLLMGenerator

    assert isinstance(gen, VLLMGenerator)  # auto picks vLLM: installed, CUDA present, a plain model directory
    prompts = PROMPTS if cfg.continue_final_message else PROMPTS[:3]
    got = gen.generate(prompts, cfg, progress=False)
    want = _hf(tiny_llama_dir).generate(prompts, cfg, progress=False)
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason) == (
            w.text, w.prompt_tokens, w.completion_tokens, w.finish_reason)  # fmt: skip
    # what reached vLLM
    engine = FakeLLM.instances[-1]
    assert engine.engine_args["load_format"] == "safetensors" and engine.engine_args["trust_remote_code"] is False
    sent, params = engine.calls[-1]
    hf = _hf(tiny_llama_dir)
    assert [s["prompt_token_ids"] for s in sent] == hf.encode(prompts, cfg)
    assert all(p.stop_token_ids == hf.eos_ids and p.max_tokens == cfg.max_new_tokens for p in params)
    if cfg.do_sample:
        assert [p.seed for p in params] == [cfg.seed * 1_000_003 + i for i in range(len(prompts))]
        assert all(p.top_k == (cfg.top_k or -1) and p.top_p == cfg.top_p for p in params)
    else:
        assert all(p.temperature == 0.0 for p in params)
    assert isinstance(gen, VLLMGenerator) and not isinstance(gen, HFGenerator)


def test_stop_rules(tiny_llama_dir: Path, fake_vllm: Any, tmp_path: Path) -> None:
    """A generation config with a second EOS id (a token the model does produce): both engines stop there."""
    import json
    import shutil

    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    first = _hf(tiny_llama_dir).generate(PROMPTS[:3], cfg, progress=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    tok = _hf(model).tokenizer
    stop_at = tok(first[0].text, add_special_tokens=False)["input_ids"][2]  # the third token of the first answer
    gen_cfg = json.loads((model / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [tok.eos_token_id, stop_at]
    (model / "generation_config.json").write_text(json.dumps(gen_cfg))
    want = _hf(model).generate(PROMPTS[:3], cfg, progress=False)
    got = get_generator(str(model)).generate(PROMPTS[:3], cfg, progress=False)
    assert want[0].finish_reason == "stop" and want[0].completion_tokens == 3
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.completion_tokens, g.finish_reason) == (w.text, w.completion_tokens, w.finish_reason)
    assert FakeLLM.instances[-1].calls[-1][1][0].stop_token_ids == [tok.eos_token_id, stop_at]


def test_vllm_sample_does_not_depend_on_the_other_prompts(tiny_llama_dir: Path, fake_vllm: Any) -> None:
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, seed=11)
    gen = get_generator(str(tiny_llama_dir))
    both = gen.generate(PROMPTS[:2], cfg, progress=False)
    alone = gen.generate(PROMPTS[:1], cfg, progress=False)
    assert both[0].text == alone[0].text


def test_selection(tiny_llama_dir: Path, fake_vllm: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    from tunesec.models.generation import HFGenerator, VLLMGenerator

    # (CUDA is only pretended: the HF engine loads on the CPU)
    assert isinstance(get_generator(str(tiny_llama_dir), backend="hf", device="cpu"), HFGenerator)
    gen = get_generator(str(tiny_llama_dir), backend="vllm", max_batch_size=8, dtype=torch.bfloat16)
    assert isinstance(gen, VLLMGenerator)
    assert FakeLLM.instances[-1].engine_args["max_num_seqs"] == 8
    assert FakeLLM.instances[-1].engine_args["dtype"] == "bfloat16"
    with pytest.raises(UsageError, match="backend 'gpu': expected auto, hf or vllm"):
        get_generator(str(tiny_llama_dir), backend="gpu")
    # an adapter: auto falls back to the HF engine; vllm asked for explicitly is refused in one line
    adapter = _adapter(tiny_llama_dir, tmp_path)
    import tunesec.models
    import tunesec.models.generation

    chosen: list[Any] = []
    monkeypatch.setattr(tunesec.models, "load_model", lambda ref, **kw: ref)  # (PEFT would pin memory for "CUDA")
    monkeypatch.setattr(tunesec.models.generation, "HFGenerator", lambda loaded, **kw: chosen.append(loaded) or "hf")
    assert get_generator(str(adapter)) == "hf" and chosen[0].adapter == str(adapter.resolve())
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsageError, match="backend vllm: .* is not a plain Hugging Face model"):
        get_generator(str(adapter), backend="vllm")
    # no CUDA: auto is the HF engine; vllm asked for is bad input
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(get_generator(str(tiny_llama_dir)), HFGenerator)
    with pytest.raises(UsageError, match="backend vllm: needs .* CUDA GPU"):
        get_generator(str(tiny_llama_dir), backend="vllm")


def test_vllm_without_cuda_is_one_line(tiny_llama_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """On this machine (no CUDA, no vllm): the generate command asked for vLLM says so in one line, exit 2."""
    from tunesec.cli.main import main

    code = main(["generate", str(tiny_llama_dir), "--prompt", "hello", "--backend", "vllm"])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "backend vllm: needs `pip install tunesec[vllm]` and a CUDA GPU" in lines[0]


def _adapter(tiny: Path, tmp_path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(tiny), device="cpu")
    peft = get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    out = tmp_path / "adapter"
    peft.save_pretrained(str(out))
    import json

    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out
