"""Faults lose nothing: a full disk, two runs in one folder, a damaged checkpoint, data changed under a resume, a NaN
gradient. Each ends with a one-line message (no traceback) and every complete output intact."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_args import make_plan

from lmdistill.cli import main
from lmdistill.errors import LmdistillError


def _argv(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "48", "--batch_size", "4",
            "--log_interval", "1", *map(str, extra)]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("lmdistill distill: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- a full disk ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15744 vs 15636"),  # torch's zip writer
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_write_that_fails_keeps_the_last_checkpoint_and_says_why(failure, tiny_teacher_dir, tiny_chat, tmp_path,
                                                                   monkeypatch, capsys):
    import lmdistill.train.state as state

    real, calls = state.torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint's training state
            raise failure
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", failing_save)
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 6, "--save_interval", 2)) == 1
    line = _one_line_error(capsys)
    why = "the write was cut short (a full disk?)" if isinstance(failure, RuntimeError) else "no space left"
    assert f"writing checkpoint-4 to '{out}' failed: {why}" in line and "free there" in line
    assert f"the last complete checkpoint, {out / 'checkpoint-2'}, is intact" in line
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no partial folder
    monkeypatch.setattr(state.torch, "save", real)
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 6, "--save_interval", 2, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out


def test_no_room_for_the_first_save_is_refused_before_step_one(tiny_teacher_dir, tiny_chat, tmp_path, monkeypatch,
                                                               capsys):
    import lmdistill.errors as errors

    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 3)) == 1
    line = _one_line_error(capsys)
    assert "not enough space for the run's first save" in line and "1000 B free" in line
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()  # no step was run


def test_a_real_small_filesystem(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    """On a tmpfs too small for a second checkpoint (root only): refused before writing, the first one intact."""
    from lmdistill.train.state import folder_bytes

    probe = tmp_path / "probe"
    assert main(_argv(tiny_teacher_dir, tiny_chat, probe, "--max_steps", 1, "--save_interval", 1)) == 0
    one = folder_bytes(probe / "checkpoint-1")  # room for the first save (estimated with 1 MiB to spare) + ~3 more
    mount = tmp_path / "small"
    mount.mkdir()
    size = f"size={(one + 2**20 + 3 * one) // 1024}k"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    capsys.readouterr()
    try:
        out = mount / "run"
        code = main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 8, "--save_interval", 1,
                          "--keep_checkpoints", 0))
        line = _one_line_error(capsys)
        assert code == 1 and ("not enough space for checkpoint-" in line or "failed: no space left" in line)
        saved = sorted(out.glob("checkpoint-*"))
        assert saved and not list(out.glob(".checkpoint-*"))
        from lmdistill.train.state import verify_checkpoint

        assert all(verify_checkpoint(p) is None for p in saved)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# -- two runs in one folder -----------------------------------------------------------------------------------
HOLD = """
import sys, time
from lmdistill.train.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_into_a_held_folder_is_refused_and_a_dead_holder_is_taken_over(tiny_teacher_dir, tiny_chat,
                                                                                    tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"]):
            assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 2, *extra)) == 1
            line = _one_line_error(capsys)
            assert f"'{out}' is in use by another run (pid {holder.pid} on" in line and "started" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 2)) == 0  # the OS lock died with its holder
    assert f"the run that held it (pid {holder.pid}" in capsys.readouterr().out


def test_the_lock_is_held_for_the_run_and_a_failed_start_leaves_no_folder(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.lock import RunLock
    from lmdistill.train.loop import Trainer

    out = tmp_path / "run"
    trainer = Trainer(make_plan("distill", _argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 1)[1:]))
    with pytest.raises(LmdistillError, match="is in use by another run"):
        RunLock(out).acquire()
    trainer.close()
    RunLock(out).acquire().release()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn: fails in setup
    with pytest.raises(LmdistillError):
        Trainer(make_plan("distill", _argv(tiny_teacher_dir, bad, tmp_path / "never", "--max_steps", 1)[1:]))
    assert not (tmp_path / "never").exists()


# -- damaged checkpoints --------------------------------------------------------------------------------------
def _truncate(folder: Path) -> None:
    for name in ("model.safetensors", "training_state.pt"):
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_passes_over_a_damaged_newest_checkpoint(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 6, "--save_interval", 2, "--keep_checkpoints", 3)
    assert main(argv) == 0
    straight = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    _truncate(out / "checkpoint-6")
    capsys.readouterr()
    assert main([*argv, "--resume", "--strict_resume"]) == 1
    line = _one_line_error(capsys)
    assert f"the newest checkpoint '{out / 'checkpoint-6'}' is damaged" in line and "--strict_resume refuses" in line
    assert main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint-6 is damaged (" in text and "resuming from checkpoint-4" in text
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = lambda rows: [r for r in rows if r["type"] == "train"][-1]  # noqa: E731
    assert last(resumed)["step"] == 6 and abs(last(resumed)["loss"] - last(straight)["loss"]) < 1e-5
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        _truncate(out / name)
    assert main([*argv, "--resume"]) == 1
    line = _one_line_error(capsys)
    assert "no intact checkpoint" in line and all(f"checkpoint-{s}: " in line for s in (2, 4, 6))


def test_checkpoints_carry_a_manifest_that_catches_any_change(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.state import MANIFEST_FILE, verify_checkpoint

    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 2, "--save_interval", 1)) == 0
    ckpt = out / "checkpoint-2"
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert {"model.safetensors", "training_state.pt", "data.json"} <= set(files)
    assert verify_checkpoint(ckpt) is None
    state = ckpt / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    state.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt) == "training_state.pt does not match its checksum"
    (ckpt / "model.safetensors").unlink()
    assert verify_checkpoint(ckpt) == "model.safetensors is missing"


# -- data changed under a resume ------------------------------------------------------------------------------
def test_resume_refuses_data_that_changed(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(tiny_chat, data)
    out = tmp_path / "run"
    argv = _argv(tiny_teacher_dir, data, out, "--max_steps", 4, "--save_interval", 2)
    assert main(argv) == 0
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines[:30])) + "\n")  # fewer records, another order; same path
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 1
    line = _one_line_error(capsys)
    assert f"--data '{data}' changed since checkpoint-4 was written" in line
    assert "bytes" in line and "content checksum" in line and "40 examples" in line
    assert main([*argv, "--resume", "--allow_config_change"]) == 0
    assert "the resume is not exact" in capsys.readouterr().out


# -- non-finite gradients and strict JSON ---------------------------------------------------------------------
def test_a_nan_gradient_stops_before_the_update(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.loop import Trainer

    trainer = Trainer(make_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path / "run", "--max_steps", 3)[1:]))
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: torch.full_like(g, float("nan")))  # the loss stays finite
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(LmdistillError, match=r"step 1: the gradient norm is nan; stopping before the optimizer step"):
        trainer.step()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # nothing was applied
    trainer.close()


def test_metrics_are_strict_json():
    from lmdistill.train.metrics import json_line

    line = json_line({"loss": float("nan"), "grad_norm": float("inf"), "terms": [1.0, float("-inf")], "ok": 2.5})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "loss": None, "grad_norm": None, "terms": [1.0, None], "ok": 2.5}


# -- other writers --------------------------------------------------------------------------------------------
def test_a_teacher_cache_that_cannot_be_written_leaves_nothing(tiny_teacher_dir, tiny_chat, tmp_path, monkeypatch,
                                                               capsys):
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    out = tmp_path / "cache"
    assert main(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(tiny_chat), "--output_dir",
                 str(out), "--max_seq_len", "48", "--top_k", "4"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "writing the teacher cache" in err and "no space left on the device" in err
    assert not out.exists() and not list(tmp_path.glob(".cache.tmp-*"))


def test_generate_keeps_the_replies_written_before_a_failed_write(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    import lmdistill.generate as generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"say {i}"}]}) + "\n"
                               for i in range(6)))
    out = tmp_path / "gen.jsonl"
    real, calls = generate.os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(generate.os, "fsync", failing_fsync)
    argv = ["generate", "--model", str(tiny_teacher_dir), "--data", str(prompts), "--output_file", str(out),
            "--max_new_tokens", "4", "--batch_size", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "replies written before are kept" in err
    assert len(out.read_text().splitlines()) == 2 and out.read_text().endswith("\n")  # the first batch, whole
    monkeypatch.setattr(generate.os, "fsync", real)
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 6
