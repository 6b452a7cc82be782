"""On-policy distillation (GKD): the student writes a seeded share of the steps' replies; the loss is taken on
its completion tokens only; resume stays exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmdistill.cli import main, parse_plan
from lmdistill.data import IGNORE_INDEX, load_examples
from lmdistill.models.generation import Reply
from lmdistill.tokenizer import load_tokenizer
from lmdistill.train.batches import DatasetStream
from lmdistill.train.on_policy import OnPolicyStream, completion_example, last_prompt


def test_the_prompt_is_the_conversation_before_its_last_reply(tiny_teacher_dir, tiny_chat):
    tok = load_tokenizer(tiny_teacher_dir)
    example = load_examples(tiny_chat, tok, 256)[0]
    prompt = last_prompt(example)
    first_reply, last_reply = json.loads(tiny_chat.read_text().splitlines()[0])["conversations"][1::2]
    text = tok.decode(prompt)
    assert first_reply["content"] in text and last_reply["content"] not in text
    assert text.rstrip().endswith("assistant")  # the generation prompt of the last turn is kept
    made = completion_example(prompt, Reply("x", [7, 8, 9], True, 2))
    assert made["input_ids"] == prompt + [7, 8, 9, 2]
    assert made["labels"] == [IGNORE_INDEX] * len(prompt) + [7, 8, 9, 2]  # the reply and its stop token
    cut = completion_example(prompt, Reply("x", [7, 8], False, None))
    assert cut["labels"][-2:] == [7, 8] and len(cut["labels"]) == len(prompt) + 2


def test_the_stream_replaces_replies_on_a_seeded_share_of_steps(tiny_teacher_dir, tiny_chat):
    tok = load_tokenizer(tiny_teacher_dir)
    examples = load_examples(tiny_chat, tok, 64)
    calls = []

    def fake_generate(prompts):
        calls.append(len(prompts))
        return [Reply("", [5] * (1 + i % 3), i % 2 == 0, 1 if i % 2 == 0 else None) for i in range(len(prompts))]

    stream = OnPolicyStream(DatasetStream(examples, tok.pad_token_id, 4, 2, seed=3), 0.5, 3, fake_generate)
    flags = [stream.on_policy(s) for s in range(400)]
    assert 0.4 < sum(flags) / len(flags) < 0.6 and flags == [stream.on_policy(s) for s in range(400)]
    step = flags.index(True)
    batches = stream.batches(step)
    assert len(batches) == 2 and calls == [4, 4]
    for batch in batches:
        for row, labels in zip(batch.input_ids, batch.labels):
            trained = labels[labels != IGNORE_INDEX].tolist()
            assert set(trained) <= {5, 1} and trained[0] == 5  # only the completion is trained
    assert stream.last_stats["on_policy"] and stream.last_stats["generated_tokens"] == 2 * (1 + 2 + 3 + 1)
    assert stream.last_stats["cut_share"] == 0.5
    off = flags.index(False)
    assert not stream.batches(off)[0].labels.equal(batches[0].labels) and not stream.last_stats["on_policy"]


def _argv(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4",
            "--max_new_tokens", "6", "--log_interval", "1", "--seed", "2", *map(str, extra)]


def test_on_policy_reverse_kl_runs_and_logs_its_generation(tiny_teacher_dir, tiny_chat, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--on_policy_fraction", 1, "--divergence", "reverse_kl",
                      "--max_steps", 2)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["on_policy"] is True and r["generated_tokens"] > 0 and r["step_seconds"] > 0
        assert 0 <= r["cut_share"] <= 1 and r["mean_completion_tokens"] <= 6
        assert torch.isfinite(torch.tensor(r["kd_loss"]))
    assert (out / "model.safetensors").is_file()


def test_the_student_replies_are_scored_by_the_teacher_on_the_completion(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.loop import Trainer

    trainer = Trainer(parse_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path, "--on_policy_fraction", 1,
                                                  "--divergence", "jsd")[1:]))
    batches = trainer.micro_batches(0)
    n = sum(len(b.example_index) for b in batches)
    last = trainer.source.last_stats
    finished = round((1 - last["cut_share"]) * n)
    trained = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
    assert trained == last["generated_tokens"] + finished  # every reply token, plus each stop token produced
    stats = trainer.accumulate(batches)
    assert stats["trained_tokens"] == trained and stats["kd_loss"] > 0


def test_a_teacher_cache_cannot_score_student_replies(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    argv = _argv(tiny_teacher_dir, tiny_chat, tmp_path / "run", "--on_policy_fraction", 0.5)
    i = argv.index("--teacher")
    argv[i : i + 2] = ["--teacher_cache", str(tmp_path)]
    assert main(argv) == 1
    assert "cannot score replies the student writes" in capsys.readouterr().err


def test_gkd_resume_reproduces_the_straight_run(tiny_teacher_dir, tiny_chat, tmp_path):
    def run(out, env=None, *extra):
        cmd = [sys.executable, "-m", "lmdistill", *_argv(tiny_teacher_dir, tiny_chat, out, "--on_policy_fraction",
                                                          0.5, "--max_steps", 6, "--save_interval", 2, *extra)[0:]]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                              text=True, timeout=300)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(straight).returncode == 0
    assert run(killed, {"LMDISTILL_KILL_AT_STEP": "5"}).returncode == -9
    resumed = run(killed, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def last(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["on_policy"], r["generated_tokens"] if r["on_policy"] else 0, r["loss"]) for r in rows]

    a, b = last(straight), last(killed)
    assert [x[:3] for x in a] == [x[:3] for x in b] and any(x[1] for x in a) and not all(x[1] for x in a)
    assert a[-1][3] == pytest.approx(b[-1][3], rel=1e-5)


def test_a_prompts_only_file_is_enough_when_fully_on_policy(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"the dog finds {i}"}]}) + "\n"
                               for i in range(12)))
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, prompts, out, "--on_policy_fraction", 1, "--max_steps", 2)) == 0
    assert "12 prompts (fully on-policy" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy"] and r["trained_tokens"] > 0 for r in rows)
    assert main(_argv(tiny_teacher_dir, prompts, tmp_path / "half", "--on_policy_fraction", 0.5,
                      "--max_steps", 2)) == 1  # off-policy steps need the dataset's replies
    assert "prompts.jsonl:1: a conversation without any assistant turn" in capsys.readouterr().err


def test_two_ranks_each_write_their_own_replies(tiny_teacher_dir, tiny_chat, tmp_path):
    """DDP: each rank generates for its own prompts; the step's gradients come out finite and synchronized."""
    from pathlib import Path

    tests = Path(__file__).parent
    out = tmp_path / "grads.pt"
    argv = _argv(tiny_teacher_dir, tiny_chat, tmp_path / "run", "--on_policy_fraction", 1, "--device", "cpu")[1:]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(tests / "ddp_worker.py"), str(out), "distill", *argv, "--batch_size", "2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tests)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grads = torch.load(out)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_a_two_rank_on_policy_run_resumes_exactly(tiny_teacher_dir, tiny_chat, tmp_path):
    """Every rank's sampling RNG is in the checkpoint, so each rank writes the same completions after a resume."""
    import socket

    def run(out, env=None, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = _argv(tiny_teacher_dir, tiny_chat, out, "--on_policy_fraction", 1, "--max_steps", 4, "--save_interval",
                     2, "--device", "cpu", "--batch_size", 2, *extra)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "lmdistill", *argv]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                              text=True, timeout=300)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run(straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run(killed, {"LMDISTILL_KILL_AT_STEP": "3"}).returncode != 0
    resumed = run(killed, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def rows(out):
        return [(r["step"], r["generated_tokens"], r["loss"]) for r in
                map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    a, b = rows(straight), rows(killed)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert a[-1][2] == pytest.approx(b[-1][2], rel=1e-5)


def test_text_blocks_stay_off_policy_beside_conversations(tiny_teacher_dir, tmp_path):
    """A file mixing documents and conversations: on an on-policy step the conversations' replies are the
    student's, the text blocks (no prompt) are trained as they are."""
    tok = load_tokenizer(tiny_teacher_dir)
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]},  # a text block: every token trained
                {"input_ids": [9, 10, 11, 12], "labels": [-100, -100, 11, 12]}]  # prompt [9, 10], reply [11, 12]
    seen = []

    def fake_generate(prompts):
        seen.extend(prompts)
        return [Reply("", [20, 21], True, 1) for _ in prompts]

    stream = OnPolicyStream(DatasetStream(examples, tok.pad_token_id, 2, 1, seed=0), 1.0, 0, fake_generate)
    batch = stream.batches(0)[0]
    assert seen == [[9, 10]]
    rows = {tuple(r[r != tok.pad_token_id].tolist()) for r in batch.input_ids}
    assert rows == {(5, 6, 7, 8), (9, 10, 20, 21, 1)}
    assert stream.last_stats["generated_tokens"] == 2


def test_generation_options_reach_the_student_sampler(tiny_teacher_dir, tiny_chat, tmp_path, monkeypatch):
    import lmdistill.models.generation as generation
    from lmdistill.train.loop import Trainer

    seen = {}
    real = generation.generate_replies

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_replies", spy)
    trainer = Trainer(parse_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path, "--on_policy_fraction", 1,
                                                  "--generation_temperature", 0.7, "--generation_top_p", 0.9,
                                                  "--generation_backend", "hf")[1:]))
    trainer.micro_batches(0)
    assert seen["temperature"] == 0.7 and seen["top_p"] == 0.9 and seen["max_new_tokens"] == 6
    assert seen["backend"] == "hf"


@pytest.fixture(scope="module")
def second_teacher(tiny_teacher_dir, tmp_path_factory):
    """Another teacher of the same tokenizer (the tiny teacher with its weights perturbed)."""
    from lmdistill.models import load_teacher

    model = load_teacher(str(tiny_teacher_dir), dtype="float32", device="cpu", verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    out = tmp_path_factory.mktemp("teacher2")
    model.save_pretrained(out)
    load_tokenizer(tiny_teacher_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("extra", [["ENSEMBLE"], ["--lora_r", 4], ["--dtype", "bfloat16"],
                                   ["--accumulation_steps", 2, "--batch_size", 2]],
                         ids=["ensemble", "lora", "bf16", "accumulation"])
@pytest.mark.parametrize("method", ["gkd", "minillm"])
def test_on_policy_methods_work_with(method, extra, tiny_teacher_dir, tiny_chat, second_teacher, tmp_path):
    extra = ["--teacher", second_teacher] if extra == ["ENSEMBLE"] else extra
    flags = ["--on_policy_fraction", 1, "--divergence", "jsd"] if method == "gkd" else ["--method", "minillm"]
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, *flags, *extra, "--max_steps", 2)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["on_policy"] and r["generated_tokens"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] != 0 for r in rows)


@pytest.mark.parametrize("worker", ["ddp_worker.py", "fsdp_worker.py"])
@pytest.mark.parametrize("method", ["gkd", "minillm"])
def test_two_ranks_sample_and_train_on_policy(worker, method, tiny_teacher_dir, tiny_chat, tmp_path):
    """DDP and FSDP2 (a sharded student's every forward is collective: the ranks decode until all have stopped)."""
    from runs import torchrun

    out = tmp_path / "grads.pt"
    flags = ["--on_policy_fraction", 1, "--divergence", "reverse_kl"] if method == "gkd" else ["--method", "minillm"]
    argv = _argv(tiny_teacher_dir, tiny_chat, tmp_path / "run", *flags, "--device", "cpu", "--max_new_tokens",
                 12)[1:]
    proc = torchrun(worker, out, "distill", [*argv, "--batch_size", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    grads = torch.load(out)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
