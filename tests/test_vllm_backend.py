"""The optional vLLM backend: refused clearly where it cannot run (no vLLM, no CUDA) before any model loads; its
adapter (replies, stop tokens, seeds, weight sync with LoRA merged) against a stand-in `vllm` module on CPU; and,
where CUDA and vLLM exist, a real on-policy run and `lmdistill generate` through it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from lmdistill.cli import main

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _distill(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4",
            "--max_new_tokens", "6", "--seed", "2", *map(str, extra)]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_backend_is_refused_before_loading(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_distill(tiny_teacher_dir, tiny_chat, out, "--on_policy_fraction", 1,
                         "--generation_backend", "vllm")) == 1
    assert "--generation_backend vllm: vLLM is not installed here" in capsys.readouterr().err
    assert not out.exists()
    assert main(["generate", "--model", str(tiny_teacher_dir), "--prompts", str(tiny_chat), "--output_file",
                 str(tmp_path / "o.jsonl"), "--generation_backend", "vllm"]) == 1
    assert "vLLM is not installed here" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_vllm_is_refused_where_it_would_do_nothing_or_cannot_work(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    assert main(_distill(tiny_teacher_dir, tiny_chat, tmp_path / "a", "--generation_backend", "vllm")) == 1
    assert "nothing is generated at --on_policy_fraction 0" in capsys.readouterr().err
    assert main(_distill(tiny_teacher_dir, tiny_chat, tmp_path / "b", "--method", "minillm",
                         "--generation_backend", "vllm")) == 1
    assert "MiniLLM samples from the teacher-student mixture token by token" in capsys.readouterr().err


# -- the adapter, against a stand-in vllm module ----------------------------------------------------------------------
class _FakeLLM:
    """Records what lmdistill asks of vLLM's LLM and answers with scripted completions."""

    script: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.loaded, self.calls = kwargs, [], []
        # vLLM copies the weights into its own buffers at once; the stand-in clones them
        model = SimpleNamespace(load_weights=lambda weights: self.loaded.append({k: v.clone() for k, v in weights}))
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))

    def collective_rpc(self, fn, args=()):
        return [fn(self.worker, *args)]

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        return [SimpleNamespace(outputs=[SimpleNamespace(**c)]) for c in self.script[: len(prompts)]]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return vllm


def test_replies_keep_the_stop_token_apart_and_each_prompt_has_its_seed(fake_vllm, tiny_teacher_dir):
    from lmdistill.models.vllm_backend import VllmGenerator, reply_seeds
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_teacher_dir)
    eos = tok.eos_token_id
    _FakeLLM.script = [
        dict(token_ids=[7, 8, eos], finish_reason="stop", stop_reason=None),  # vLLM kept the stop token
        dict(token_ids=[9], finish_reason="stop", stop_reason=eos),  # ... or reported it apart
        dict(token_ids=[5, 6, 7], finish_reason="length", stop_reason=None),  # cut at max_new_tokens
    ]
    engine = VllmGenerator("/some/folder", tok, gpu_memory_utilization=0.25, seed=3)
    assert engine.llm.kwargs["gpu_memory_utilization"] == 0.25 and engine.llm.kwargs["seed"] == 3
    seeds = reply_seeds(3, 5, 0, 3)
    replies = engine.replies([[1, 2], [3], [4, 5, 6]], 3, temperature=1.0, top_p=0.9, stops=[eos], seeds=seeds)
    assert [(r.token_ids, r.finished, r.stop_token) for r in replies] == [
        ([7, 8], True, eos), ([9], True, eos), ([5, 6, 7], False, None)]
    prompts, params = engine.llm.calls[-1]
    assert [p["prompt_token_ids"] for p in prompts] == [[1, 2], [3], [4, 5, 6]]
    assert [p.seed for p in params] == seeds and len(set(seeds)) == 3
    assert all(p.max_tokens == 3 and p.top_p == 0.9 and p.stop_token_ids == [eos] for p in params)
    assert reply_seeds(3, 5, 0, 3) == seeds and reply_seeds(3, 6, 0, 3) != seeds  # a function of the step


def test_sync_loads_the_merged_lora_weights_under_hf_names(fake_vllm, tiny_teacher_dir):
    from lmdistill.models import apply_lora, load_model
    from lmdistill.models.vllm_backend import VllmGenerator
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_teacher_dir)
    torch.manual_seed(0)
    base = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=1, verbose=False)
    plain_names = set(base.state_dict())
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: merged weights differ from the base
    ids = torch.tensor([[5, 6, 7]])
    before = model(ids).logits.detach().clone()
    merged = {k: v.clone() for k, v in __import__("copy").deepcopy(model).merge_and_unload().state_dict().items()}
    engine = VllmGenerator("/some/folder", tok)
    engine.sync(model)
    loaded = engine.llm.loaded[-1]
    assert set(loaded) == plain_names  # HF checkpoint names, no lora_ or base_layer names
    for name, value in loaded.items():
        torch.testing.assert_close(value, merged[name])
    assert "reset" in engine.llm.calls  # prefix caches of the old weights dropped
    torch.testing.assert_close(model(ids).logits, before)  # the adapter is unmerged again


def test_check_vllm_needs_cuda(fake_vllm):
    from lmdistill.errors import LmdistillError
    from lmdistill.models.vllm_backend import check_vllm

    if torch.cuda.is_available():
        with pytest.raises(LmdistillError, match="on CUDA GPUs only; the run's device is cpu"):
            check_vllm("cpu")
    else:
        with pytest.raises(LmdistillError, match="vLLM generates on CUDA GPUs only"):
            check_vllm(None)


# -- the real thing, where it can run ----------------------------------------------------------------------------------
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_on_policy_run_and_generate_through_vllm(tiny_teacher_dir, tiny_chat, tmp_path):
    out = tmp_path / "run"
    assert main(_distill(tiny_teacher_dir, tiny_chat, out, "--on_policy_fraction", 1, "--device", "cuda",
                         "--generation_backend", "vllm", "--max_steps", 3, "--log_interval", 1)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy"] and r["generated_tokens"] > 0 for r in rows)
    replies = tmp_path / "replies.jsonl"
    assert main(["generate", "--model", str(tiny_teacher_dir), "--prompts", str(tiny_chat), "--output_file",
                 str(replies), "--generation_backend", "vllm", "--max_new_tokens", "8", "--device", "cuda"]) == 0
    assert len(replies.read_text().splitlines()) == 40
