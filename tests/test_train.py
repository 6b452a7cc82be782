"""The training loop: normalization invariants on gradients, exact resume, signals, errors, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_args import make_plan

from lmdistill.cli import main
from lmdistill.train.loop import Trainer

TESTS = Path(__file__).parent


def _distill_argv(teacher, data, out, *extra):
    return ["--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--log_interval", "1",
            "--temperature", "2.0", "--alpha", "0.3", "--seed", "3", *map(str, extra)]


def _step_grads(command, argv) -> dict[str, torch.Tensor]:
    trainer = Trainer(make_plan(command, argv))
    trainer.accumulate(trainer.micro_batches(0))
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.close()  # the run's folder is free for the next Trainer
    return grads


def _assert_same_grads(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=f"gradient of {name}")


@pytest.mark.parametrize("command", ["distill", "train"])
def test_accumulation_equals_large_batch_on_gradients(command, tiny_teacher_dir, tiny_chat, tmp_path):
    if command == "distill":
        base = _distill_argv(tiny_teacher_dir, tiny_chat, tmp_path)
    else:
        base = ["--model", "nano", "--hidden_size", "32", "--num_layers", "1", "--tokenizer", str(tiny_teacher_dir),
                "--data", str(tiny_chat), "--output_dir", str(tmp_path), "--max_seq_len", "64"]
    one_by_eight = _step_grads(command, base + ["--batch_size", "1", "--accumulation_steps", "8"])
    eight_by_one = _step_grads(command, base + ["--batch_size", "8", "--accumulation_steps", "1"])
    _assert_same_grads(one_by_eight, eight_by_one)
    # the loss is normalized per trained token of the whole step: doubling the step's examples must not
    # double the gradient scale
    assert max(g.abs().max() for g in one_by_eight.values()) < 100


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("worker", ["ddp_worker.py", "fsdp_worker.py"])
def test_two_ranks_equal_one_rank_on_gradients(worker, tiny_teacher_dir, tiny_chat, tmp_path):
    argv = _distill_argv(tiny_teacher_dir, tiny_chat, tmp_path / "run", "--device", "cpu")
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(TESTS / worker), str(out), "distill", *argv, "--batch_size", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = torch.load(out)
    single = _step_grads("distill", argv + ["--batch_size", "4"])
    _assert_same_grads(multi, single)


def _run(argv, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lmdistill", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _last_train_loss(run_dir: Path) -> tuple[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["type"] == "train"][-1]
    return last["step"], last["loss"]


def test_sigkill_then_resume_reproduces_the_straight_run(tiny_teacher_dir, tiny_chat, tmp_path):
    common = ["distill", *_distill_argv(tiny_teacher_dir, tiny_chat, None), "--max_steps", "6", "--batch_size", "4",
              "--save_interval", "2", "--warmup_iters", "2"]
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    argv = lambda out: [a if a != "None" else str(out) for a in common]  # noqa: E731
    assert _run(argv(straight)).returncode == 0
    proc = _run(argv(killed), {"LMDISTILL_KILL_AT_STEP": "5"})
    assert proc.returncode == -9  # SIGKILL after step 5: checkpoint-4 is the newest complete one
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _run(argv(killed) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    s_step, s_loss = _last_train_loss(straight)
    r_step, r_loss = _last_train_loss(killed)
    assert s_step == r_step == 6
    assert abs(s_loss - r_loss) <= 1e-5 * max(1.0, abs(s_loss))
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated steps after resume


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_checkpoint_and_exits_nonzero(sig, code, tiny_teacher_dir, tiny_chat, tmp_path):
    argv = ["distill", *_distill_argv(tiny_teacher_dir, tiny_chat, tmp_path), "--max_steps", "20", "--batch_size", "2"]
    proc = _run(argv, {f"LMDISTILL_{sig}_AT_STEP": "3"})
    assert proc.returncode == code, proc.stderr[-2000:]  # so `distill ... && eval ...` stops at an unfinished run
    assert f"stopped by {sig} after step 3 of 20" in proc.stdout and "--resume" in proc.stdout
    assert (tmp_path / "checkpoint-3" / "training_state.pt").is_file()
    assert not (tmp_path / "model.safetensors").exists()  # not a finished run


def test_nan_loss_stops_with_the_step_named(tiny_teacher_dir, tiny_chat, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken_teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for f in tiny_teacher_dir.glob("*token*"):
        (broken / f.name).write_bytes(f.read_bytes())
    code = main(["distill", *_distill_argv(broken, tiny_chat, tmp_path / "run"), "--max_steps", "3"])
    assert code == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_final_outputs_frozen_teacher_and_minimind_flags(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    argv = ["--teacher", str(tiny_teacher_dir), "--student", "nano", "--dim", "32", "--n_layers", "1",
            "--data_path", str(tiny_chat), "--out_dir", str(out), "--epochs", "1", "--batch_size", "8",
            "--accumulation_steps", "1", "--learning_rate", "1e-3", "--dtype", "float32", "--device", "cpu",
            "--num_workers", "0", "--ddp", "--grad_clip", "1.0", "--warmup_iters", "1", "--log_interval", "1",
            "--save_interval", "0", "--max_seq_len", "64", "--alpha", "0.5", "--temperature", "2.0",
            "--eval_data", str(tiny_chat), "--eval_batches", "2"]
    args = make_plan("distill", argv)
    trainer = Trainer(args)
    teacher_before = {n: p.clone() for n, p in trainer.teacher.model.named_parameters()}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in trainer.teacher.model.parameters())
    assert trainer.total_steps == 5  # 40 dialogs / 8 per step, one epoch
    assert trainer.train() == 0
    assert not trainer.teacher.model.training and not any(p.requires_grad for p in trainer.teacher.model.parameters())
    for n, p in trainer.teacher.model.named_parameters():
        assert torch.equal(p, teacher_before[n])
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for key in ("loss", "kd_loss", "ce_loss", "lr", "tokens_per_sec"):
        assert all(isinstance(r[key], float) for r in train), key
    ev = [r for r in rows if r["type"] == "eval"][-1]
    assert {"ce", "ppl", "kl_to_teacher", "agreement", "bits_per_byte"} <= ev.keys()
    assert (out / "lmdistill_config.yaml").is_file()


def test_rerun_with_overwrite_starts_a_new_log_and_restores_signal_handlers(tiny_teacher_dir, tiny_chat,
                                                                            tmp_path):
    import signal

    out = tmp_path / "run"

    def mine(signum, frame):  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        for steps, extra in ((3, []), (2, ["--overwrite"])):
            assert Trainer(make_plan("distill", _distill_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps",
                                                              steps, "--batch_size", 4, *extra))).train() == 0
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_recipe_yaml_and_unknown_key(tiny_teacher_dir, tiny_chat, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {tiny_teacher_dir}\nstudent: nano\ndim: 32\nn_layers: 1\ndata_path: {tiny_chat}\n"
                      f"out_dir: {tmp_path / 'run'}\nmax_steps: 1\nbatch_size: 2\nmax_seq_len: 64\n")
    assert main(["distill", "--config", str(recipe), "--divergence", "rkl"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    recipe.write_text("techer: x\n")
    assert main(["distill", "--config", str(recipe)]) == 1


def test_missing_options_and_different_tokenizers_are_clean_errors(tiny_teacher_dir, tiny_chat, tmp_path,
                                                                   minimind_tokenizer_dir, capsys):
    assert main(["distill", "--student", "nano", "--data", str(tiny_chat), "--output_dir", str(tmp_path)]) == 1
    assert "distill needs a teacher: --teacher DIR" in capsys.readouterr().err
    code = main(["distill", *_distill_argv(tiny_teacher_dir, tiny_chat, tmp_path), "--tokenizer",
                 str(minimind_tokenizer_dir), "--max_steps", "1"])
    assert code == 1
    assert "tokenizers of --tokenizer" in capsys.readouterr().err


def test_padded_teacher_vocabulary_is_compared_over_real_tokens(tiny_teacher_dir, tiny_chat, tmp_path):
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded_teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 13)  # like Qwen2.5-7B vs 0.5B
    model.save_pretrained(padded)
    for f in tiny_teacher_dir.glob("*token*"):
        (padded / f.name).write_bytes(f.read_bytes())
    trainer = Trainer(make_plan("distill", _distill_argv(padded, tiny_chat, tmp_path / "run")))
    assert trainer.teacher.vocab_size == len(trainer.tokenizer)
    stats = trainer.accumulate(trainer.micro_batches(0))
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_lora_student_saves_a_merged_model(tiny_teacher_dir, tiny_chat, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = [*_distill_argv(tiny_teacher_dir, tiny_chat, out), "--max_steps", "2", "--batch_size", "2",
            "--lora_r", "4"]
    i = argv.index("--student")
    argv[i + 1 : i + 6] = [str(tiny_teacher_dir)]  # LoRA on a pretrained folder (no width/depth knobs)
    assert main(["distill", *argv]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_moe_student_aux_loss_reaches_the_objective(tiny_teacher_dir, tiny_chat, tmp_path):
    args = make_plan("distill", [*_distill_argv(tiny_teacher_dir, tiny_chat, tmp_path), "--use_moe",
                                 "--batch_size", "2"])
    trainer = Trainer(args)
    stats = trainer.accumulate(trainer.micro_batches(0))
    assert stats["aux_loss"] > 0
    router = [p for n, p in trainer.model.named_parameters() if "gate" in n and "proj" not in n]
    assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    from lmdistill.train.schedules import lr_lambda

    f = lr_lambda(4, 20)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(4, 20))


def test_temperature_schedule(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.schedules import temperature_at

    assert [temperature_at(i, 5, 4.0, None) for i in range(5)] == [4.0] * 5
    assert [temperature_at(i, 5, 4.0, 2.0) for i in range(5)] == [4.0, 3.5, 3.0, 2.5, 2.0]
    cos = [temperature_at(i, 5, 4.0, 2.0, "cosine") for i in range(5)]
    assert cos[0] == 4.0 and cos[-1] == pytest.approx(2.0) and cos[2] == pytest.approx(3.0)
    assert cos[1] > 3.5 and cos[3] < 2.5  # slow at both ends
    out = tmp_path / "run"
    argv = _distill_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 3, "--batch_size", 4,
                         "--temperature_end", 1.0, "--temperature", 3.0)
    assert main(["distill", *argv]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["temperature"] for r in rows if r["type"] == "train"] == [3.0, 2.0, 1.0]
