"""Progressive distillation (--via): stages as run folders, the final student in OUTPUT_DIR, per-stage steps,
resume that never reruns a finished stage, and the report of every stage."""

from __future__ import annotations

import json

import pytest
import yaml
from runs import lmdistill

from lmdistill.cli import main


def _argv(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4",
            "--log_interval", "1", "--seed", "2", *map(str, extra)]


def _steps(folder):
    return [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["type"] == "train"]


def test_stages_run_in_order_into_their_folders(tiny_teacher_dir, tiny_chat, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "run"
    middle = tmp_path / "middle"  # a folder --via: an initial checkpoint (here: a copy of the teacher's config)
    assert main(["train", "--model", "nano", "--hidden_size", "40", "--num_layers", "2", "--tokenizer",
                 str(tiny_teacher_dir), "--data", str(tiny_chat), "--output_dir", str(middle), "--max_steps", "1",
                 "--max_seq_len", "64", "--batch_size", "4"]) == 0
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", middle, "--via", "nano", "--stage_steps", "3,2,4")) == 0
    first, second = out / "stage-1-middle", out / "stage-2-nano"
    assert _steps(first)[-1] == 3 and _steps(second)[-1] == 2 and _steps(out)[-1] == 4
    assert AutoConfig.from_pretrained(first).hidden_size == 40  # the --via folder's model, trained further
    assert AutoConfig.from_pretrained(second).hidden_size == 128  # the preset's own size: overrides are the student's
    assert AutoConfig.from_pretrained(out).hidden_size == 32  # the final student, with --hidden_size
    configs = [yaml.safe_load((f / "lmdistill_config.yaml").read_text()) for f in (first, second, out)]
    assert [c["teacher"] for c in configs] == [[str(tiny_teacher_dir)], [str(first)], [str(second)]]
    assert all((f / "stage_done.json").is_file() for f in (first, second))


def test_resume_continues_the_unfinished_stage_and_skips_finished_ones(tiny_teacher_dir, tiny_chat, tmp_path):
    def run(out, env=None, *extra):
        return lmdistill(_argv(tiny_teacher_dir, tiny_chat, out, "--via", "nano", "--stage_steps", "2,4",
                               "--save_interval", 2, *extra), env)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(straight).returncode == 0
    # step counters restart per stage: the kill hook fires at step 3 of the second stage
    assert run(killed, {"LMDISTILL_KILL_AT_STEP": "3"}).returncode == -9
    stage = killed / "stage-1-nano"
    assert (stage / "stage_done.json").is_file() and not (killed / "model.safetensors").exists()
    before = (stage / "metrics.jsonl").read_text()
    resumed = run(killed, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finished earlier" in resumed.stdout and (stage / "metrics.jsonl").read_text() == before
    last = lambda f: [json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()][-1]  # noqa: E731
    assert last(killed)["step"] == 4 and last(killed)["loss"] == pytest.approx(last(straight)["loss"], rel=1e-5)


def test_a_used_output_dir_and_bad_stage_options_are_refused(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", "nano", "--stage_steps", "2,3,4")) == 1
    assert "--stage_steps: expected 2 step counts" in capsys.readouterr().err
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", tmp_path / "nowhere")) == 1
    assert "--via:" in capsys.readouterr().err
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--stage_steps", "2,3")) == 1
    assert "it needs --via" in capsys.readouterr().err
    assert not out.exists()
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", "nano", "--max_steps", 1)) == 0
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", "nano", "--max_steps", 1)) == 1
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", "nano", "--max_steps", 2, "--overwrite")) == 0
    assert _steps(out / "stage-1-nano")[-1] == 2


def test_the_report_shows_every_stage(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--via", "nano", "--max_steps", 2)) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage-1-nano" in printed and "final" in printed
    assert "stage-1-nano" in (out / "report.md").read_text()


def test_the_python_api_runs_the_stages(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill import DistillConfig, distill

    out = distill(DistillConfig(teacher=[str(tiny_teacher_dir)], student="nano", hidden_size=32, num_layers=1,
                                data=str(tiny_chat), output_dir=str(tmp_path / "api"), max_seq_len=64, batch_size=4,
                                via=["nano"], stage_steps=[1, 2]))
    assert _steps(out / "stage-1-nano")[-1] == 1 and _steps(out)[-1] == 2


def test_list_options_take_yaml_and_python_lists(tmp_path):
    from lmdistill.api import DistillConfig

    v = DistillConfig(teacher=["t"], student="nano", data="d", output_dir="o", via=["nano"], stage_steps=[1, 2],
                      teacher_weights=[0.25, 0.75]).values()
    assert v["stage_steps"] == [1, 2] and v["teacher_weights"] == [0.25, 0.75] and v["via"] == ["nano"]
