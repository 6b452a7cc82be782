"""`--dry_run`'s estimate: parameters counted exactly on the meta device, optimizer and gradient bytes by hand,
activations against the tensors autograd really keeps (hooks on tiny Qwen3 and Llama models), LoRA, gradient
checkpointing and world size; the CLI prints the table from configs alone (no weights file needed) and writes
nothing; and a short real run's peak RSS is within 25% of the estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lmdistill.cli import main
from lmdistill.models import build_config, load_model
from lmdistill.models.shapes import TeacherShape, meta_model, model_shape
from lmdistill.train.memory import RunShape, activation_bytes, backward_bytes, estimate, kv_bytes, layer_bytes

VOCAB = 320
# nano at hidden 48: heads 4 (head_dim 12), kv heads 2, MLP 64 * ceil(48 pi / 64) = 192, tied embeddings
NANO48 = {"hidden_size": 48, "num_layers": 2}
NANO48_PARAMS = (VOCAB * 48  # embedding = lm_head
                 + 2 * (48 * 48 + 2 * 48 * 24 + 48 * 48  # q, k, v, o
                        + 3 * 48 * 192  # gate, up, down
                        + 2 * 48 + 2 * 12)  # input/post norms, q/k norms
                 + 48)  # final norm


def _nano48(**lora):
    from lmdistill.models import apply_lora

    model = load_model("nano", vocab_size=VOCAB, device="meta", verbose=False, **NANO48)
    return model_shape(apply_lora(model, **lora) if lora else model, "nano")


def test_parameters_gradients_and_optimizer_by_hand():
    s = _nano48()
    assert s.params == s.trainable == NANO48_PARAMS == 84_768
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.mlp, s.vocab, s.qk_norm) == (
        48, 2, 4, 2, 12, 192, VOCAB, True)
    est = estimate(RunShape("train", batch_size=4, seq_len=32), s, [])
    assert est.weights == est.gradients == 4 * NANO48_PARAMS
    assert est.optimizer == 8 * NANO48_PARAMS
    assert est.tokens_per_step == 4 * 32


def test_lora_trains_only_the_adapters():
    full, lora = _nano48(), _nano48(r=4, dropout=0.0)
    # r x (in + out) per adapted projection: q 48+48, k 48+24, v 48+24, o 48+48, gate/up 48+192, down 192+48
    adapters = 2 * 4 * (96 + 72 + 72 + 96 + 240 + 240 + 240)
    assert adapters == 8_448
    assert lora.params == NANO48_PARAMS + adapters and lora.trainable == adapters
    run = RunShape("train", batch_size=4, seq_len=32)
    a, b = estimate(run, full, []), estimate(run, lora, [])
    assert b.optimizer == 8 * adapters < a.optimizer and b.gradients == 4 * adapters < a.gradients
    assert b.weights == a.weights + 4 * adapters


def _saved_bytes_per_token(model, tokens: torch.Tensor, autocast: bool = False) -> float:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded) plus the final hidden states."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    decoder = getattr(model, "base_model", model)
    decoder = getattr(decoder, "model", decoder)
    decoder = getattr(decoder, "model", decoder)  # peft: PeftModel.base_model.model.model
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        hidden = decoder(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state
    weights_cast = sum(p.numel() * 2 for p in model.parameters() if p.dim() >= 2 and p.requires_grad) if autocast else 0
    return (sum(seen.values()) - weights_cast + hidden.nbytes) / tokens.numel()


@pytest.mark.parametrize("family, model_type", [("nano", "qwen3"), ("minimind2-small", "llama")])
def test_activations_match_what_autograd_keeps(family, model_type, one_thread):
    torch.manual_seed(0)
    model = load_model(family, vocab_size=VOCAB, hidden_size=64, num_layers=3, verbose=False).train()
    shape = model_shape(model, family)
    assert shape.model_type == model_type and shape.qk_norm == (model_type == "qwen3")
    tokens = torch.randint(0, VOCAB, (2, 48))
    measured = _saved_bytes_per_token(model, tokens)
    estimated = activation_bytes(shape, 1, half=False, checkpointed=False) - backward_bytes(shape, False)
    assert estimated == pytest.approx(measured, rel=0.01)  # only RoPE's cos/sin table is left out
    model.activation_checkpointing_enable()
    kept = _saved_bytes_per_token(model, tokens)  # layer inputs; one layer is recomputed in backward
    checkpointed = activation_bytes(shape, 1, False, True) - backward_bytes(shape, False)
    assert checkpointed - layer_bytes(shape, False) == pytest.approx(kept, rel=0.01)
    assert checkpointed < estimated


def test_autocast_and_lora_activations_are_close_to_what_autograd_keeps(one_thread):
    from lmdistill.models import apply_lora

    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 48))
    model = load_model("nano", vocab_size=VOCAB, hidden_size=64, num_layers=3, verbose=False).train()
    shape = model_shape(model, "nano")
    assert activation_bytes(shape, 1, True, False) - backward_bytes(shape, True) == pytest.approx(
        _saved_bytes_per_token(model, tokens, autocast=True), rel=0.05)
    for dropout in (0.0, 0.05):
        lora = apply_lora(load_model("nano", vocab_size=VOCAB, hidden_size=64, num_layers=3, verbose=False), r=4,
                          dropout=dropout).train()
        shape = model_shape(lora, "nano")
        assert shape.lora_targets and shape.lora_dropout == dropout
        # the first layer's LoRA inputs need no gradient, so the formula may read a little high, never low
        kept = activation_bytes(shape, 1, False, False) - backward_bytes(shape, False)
        assert 0 <= kept / _saved_bytes_per_token(lora, tokens) - 1 < 0.15


def test_world_size_ddp_keeps_per_device_weights_and_fsdp_shards_them():
    s = _nano48()
    teacher = TeacherShape("t", _nano48(), "float32")
    one = estimate(RunShape("distill", 4, 32), s, [teacher], examples=100)
    ddp = estimate(RunShape("distill", 4, 32, world=4, strategy="ddp"), s, [teacher], examples=100)
    fsdp = estimate(RunShape("distill", 4, 32, world=4, strategy="fsdp"), s, [teacher], examples=100)
    assert ddp.weights == one.weights and ddp.optimizer == one.optimizer and ddp.activations == one.activations
    assert ddp.gradients == 2 * one.gradients  # DDP's gradient buckets
    assert fsdp.weights == one.weights // 4 + 4 * s.layer_params
    assert fsdp.gradients == one.gradients // 4 and fsdp.optimizer == one.optimizer // 4
    assert fsdp.teacher < one.teacher and fsdp.total(False) < one.total(False)
    assert ddp.tokens_per_step == 4 * one.tokens_per_step
    assert (one.steps, ddp.steps) == (25, 7)  # ceil(100 / 4), ceil(100 / 16)
    assert estimate(RunShape("distill", 4, 32, max_steps=9), s, [teacher], examples=None).steps == 9
    assert estimate(RunShape("distill", 4, 32), s, [teacher], examples=None).steps is None


# -- the CLI -------------------------------------------------------------------------------------------------
def test_on_policy_rows_are_prompt_plus_reply_and_generation_is_not_alive_with_the_forward():
    s, t = _nano48(), _nano48()
    teacher = [TeacherShape("t", t, "bfloat16")]
    off = estimate(RunShape("distill", batch_size=4, seq_len=32), s, teacher)
    run = RunShape("distill", batch_size=4, seq_len=32, reply_tokens=40, prompt_tokens=20)
    on = estimate(run, s, teacher)
    assert run.train_len == 60 and on.tokens_per_step == 4 * 60 and off.generation == 0
    assert on.activations == activation_bytes(s, 4 * 60, False, False)  # trained rows: prompt + reply
    # the student's KV cache: 4 rows x 60 positions x (keys + values) x 2 kv heads x head_dim 12 x fp32, per layer,
    # one layer's copy more; the prefill's one-layer forward over the prompts (3 I + 4 H per token, fp32)
    kv = 4 * 60 * 2 * 2 * 12 * 4 * (2 + 1)
    assert kv_bytes(s, 4, 60, 4) == kv and on.generation == kv + 4 * 20 * (3 * 192 + 4 * 48) * 4
    held = on.weights + on.gradients + on.optimizer + on.teacher + sum(on.host.values())
    assert on.total(False) == held + max(on.activations + on.loss, on.generation)
    # rows: a batch is padded to its longest row, so the data's longest example (at most --max_seq_len) counts;
    # on-policy rows are prompt + reply, and only those when the data gives prompts alone
    rows = RunShape("distill", batch_size=4, seq_len=512, longest_example=100)
    assert rows.train_len == 100 and replace(rows, longest_example=0).train_len == 512
    assert replace(rows, longest_example=900).train_len == 512
    assert replace(rows, reply_tokens=40, prompt_tokens=20).train_len == 100
    assert replace(rows, reply_tokens=90, prompt_tokens=20).train_len == 110
    assert replace(rows, reply_tokens=40, prompt_tokens=20, all_on_policy=True).train_len == 60
    # MiniLLM: the teacher decodes beside the student (its cache in its bf16)
    mix = estimate(replace(run, teacher_kv=True), s, teacher)
    assert mix.generation == on.generation + kv_bytes(t, 4, 60, 2)
    # a deep teacher's cache beside a checkpointed student: generation is the larger phase and the total takes it
    deep = [TeacherShape("t", replace(t, layers=200), "bfloat16")]
    big = estimate(replace(run, teacher_kv=True, gradient_checkpointing=True), s, deep)
    assert big.generation > big.activations_checkpointed + big.loss
    rest = big.weights + big.gradients + big.optimizer + big.teacher + sum(big.host.values())
    assert big.total(True) == rest + big.generation
    assert big.total(False) == rest + max(big.activations + big.loss, big.generation)
    # vLLM: its reserved share is held throughout; no decode of ours
    v = estimate(replace(run, vllm_bytes=2**30), s, teacher)
    assert v.generation == 0 and v.total(False) == held + 2**30 + v.activations + v.loss


@pytest.fixture()
def config_only(tmp_path, tiny_tokenizer_dir):
    """Model folders holding config.json and tokenizer files but no weights: only a dry run can use them."""
    import shutil

    def make(name, **knobs):
        folder = tmp_path / name
        shutil.copytree(tiny_tokenizer_dir, folder)
        build_config("nano", VOCAB, **knobs).save_pretrained(folder)
        assert not list(folder.glob("*.safetensors"))
        return folder

    return make


def test_dry_run_prints_the_table_from_configs_and_writes_nothing(config_only, tiny_corpus, tmp_path, capsys):
    t1, t2, student = config_only("t1", hidden_size=64), config_only("t2", num_layers=3), config_only("s", **NANO48)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", t1, "--teacher", t2, "--student", student, "--data", tiny_corpus,
            "--output_dir", out, "--max_seq_len", "32", "--batch_size", "4", "--accumulation_steps", "2",
            "--device", "cpu", "--lora_r", "4", "--dry_run"]
    assert main(list(map(str, argv))) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert f"{NANO48_PARAMS + 8_448:,} parameters, 8,448 trainable (LoRA r=4" in text  # as counted by hand above
    assert text.count("  teacher  ") == 2 and "3 x [" in text  # an ensemble's extra loss buffer
    assert "tokens per optimizer step: 4 x 2 accumulation x 1 process(es) x 32 = 256" in text
    assert "optimizer steps: " in text and "epoch of" in text
    for part in ("weights", "gradients", "optimizer state", "activations", "teacher", "loss", "process baseline",
                 "total (estimated peak", "device memory visible", "fits: yes"):
        assert part in text, part


def test_dry_run_with_a_teacher_cache_world_size_and_train(tiny_teacher_dir, tiny_chat, tmp_path, capsys,
                                                           monkeypatch):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(tiny_chat), "--output_dir",
                 str(cache), "--max_seq_len", "64", "--top_k", "8", "--device", "cpu"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["distill", "--teacher_cache", cache, "--student", "nano", "--data", tiny_chat, "--output_dir",
            tmp_path / "kd", "--max_seq_len", "64", "--max_steps", "7", "--device", "cpu", "--dry_run"]
    assert main(list(map(str, argv))) == 0
    text = capsys.readouterr().out
    assert f"teacher  cache {cache}: top-8 rows" in text and "teacher cache files (held in RAM)" in text
    assert "DDP over 2" in text and "8 x 1 accumulation x 2 process(es) x 64 = 1,024" in text
    assert "optimizer steps: 7 (--max_steps)" in text and not (tmp_path / "kd").exists()
    monkeypatch.delenv("WORLD_SIZE")
    argv = ["train", "--model", "nano", "--tokenizer", tiny_teacher_dir, "--data", tiny_chat, "--output_dir",
            tmp_path / "ce", "--device", "cpu", "--gradient_checkpointing", "--dry_run"]
    assert main(list(map(str, argv))) == 0
    total = next(ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("total"))
    assert total.rstrip().endswith("*") and total.count("*") == 2  # the legend's and the checkpointed column's


def test_dry_run_errors_name_the_flag_and_the_folder(config_only, tiny_corpus, tmp_path, capsys):
    broken = config_only("broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    argv = ["distill", "--teacher", broken, "--student", "nano", "--data", tiny_corpus, "--output_dir",
            tmp_path / "run", "--device", "cpu", "--dry_run"]
    assert main(list(map(str, argv))) == 1
    err = capsys.readouterr().err
    assert f"--teacher '{broken}'" in err and "config.json" in err
    with pytest.raises(Exception, match="--student 'no-such-folder'"):
        meta_model("no-such-folder", "--student", None)


# -- measured ------------------------------------------------------------------------------------------------
MEASURE = r"""
import contextlib, ctypes, json, os, resource, sys
from torch.utils._python_dispatch import TorchDispatchMode
from train_args import make_plan
from lmdistill.train.estimate import build_estimate
from lmdistill.train.setup import load_train_examples
from lmdistill.train.loop import Trainer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

class InUse(TorchDispatchMode):
    # the peak over ops of glibc's in-use heap bytes (mallinfo2: arena blocks in use + mmapped blocks), above the
    # value at the start; None without glibc >= 2.33
    def __init__(self):
        super().__init__()
        try:
            self.info = ctypes.CDLL("libc.so.6").mallinfo2
            self.info.restype = MallInfo2
            self.base = self.peak = self.now()
        except (OSError, AttributeError):
            self.info = None
    def now(self):
        m = self.info()
        return m.uordblks + m.hblkhd
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.info is not None:
            self.peak = max(self.peak, self.now())
        return out
    def above(self):
        return None if self.info is None else self.peak - self.base

plan = make_plan("distill", sys.argv[1:])
trainer = Trainer(plan)
trainer.model.train()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the RSS high-water mark starts again from here: models, data and trainer are built
base = rss()
in_use = InUse() if os.environ.get("MEASURE_IN_USE") else None  # what tensors hold from op to op (malloc's count)
with in_use or contextlib.nullcontext():
    for _ in range(3):
        trainer.step()
# VmHWM, which clear_refs reset; not ru_maxrss, which also keeps the high-water mark of before the reset once any
# thread of the process has exited (the kernel folds the mm's peak into the process's record at a thread's exit)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
est = build_estimate(plan, load_train_examples(plan))
# resident before the reset: the process, the data and the preset student; the teacher's safetensors are mapped
# and read in during the first step
print(json.dumps({"measured": peak - base, "estimated": est.total(False) - sum(est.host.values()) - est.weights,
                  "in_use": in_use and in_use.above(), "train_len": est.run.train_len}))
"""


def _measure(argv: list, in_use: bool = False) -> dict:
    """MEASURE in a fresh process; `in_use`: also sample malloc's in-use bytes after every op (a dispatch mode, which
    routes every op through Python)."""
    from runs import TESTS

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    if in_use:
        env["MEASURE_IN_USE"] = "1"
    done = subprocess.run([sys.executable, "-c", MEASURE, *map(str, argv)], capture_output=True, text=True, check=False,
                          timeout=300, cwd=TESTS, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the RSS high-water mark")
def test_a_short_run_peaks_within_25_percent_of_the_estimate(tiny_teacher_dir, tiny_corpus, tmp_path):
    r = _measure(["--teacher", tiny_teacher_dir, "--student", "nano", "--data", tiny_corpus, "--output_dir",
                  tmp_path / "run", "--max_seq_len", "256", "--batch_size", "16", "--device", "cpu"])
    assert r["estimated"] > 50 * 2**20  # activations and loss buffers dominate, not noise
    assert abs(r["estimated"] / r["measured"] - 1) < 0.25, r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the RSS high-water mark")
def test_an_on_policy_run_is_counted_at_prompt_plus_reply_rows(tiny_teacher_dir, tiny_chat, tmp_path):
    """Replies 4x longer than --max_seq_len: the student trains on prompt + reply rows, which the estimate counts
    (counted at --max_seq_len it read 17-21% of the measured RSS peak). What the tensors hold at their peak (malloc's
    in-use bytes after every op) is within 15% of it (measured +9.5%). The RSS peak reads higher: 225 MiB against
    the estimate's 195 with the per-op sampling on, 254-270 MiB without it; not memory kept after decoding
    (malloc_trim after it changed nothing). README, "Know before you run"."""
    r = _measure(["--teacher", tiny_teacher_dir, "--student", "nano", "--data", tiny_chat, "--output_dir",
                  tmp_path / "run", "--max_seq_len", "64", "--batch_size", "16", "--device", "cpu",
                  "--on_policy_fraction", "1", "--max_new_tokens", "256", "--divergence", "reverse_kl"], in_use=True)
    assert r["train_len"] >= 256 and r["estimated"] > 50 * 2**20
    if r["in_use"] is not None:
        assert abs(r["estimated"] / r["in_use"] - 1) < 0.15, r
    assert 0.65 < r["estimated"] / r["measured"] < 1.25, r
