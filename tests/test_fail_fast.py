"""Fail fast and lose nothing: bad options, files and folders are refused before any model loads or any data is
tokenized, with one line naming the flag, and a failed start writes nothing; used run folders are never silently
overwritten; every tokenizer involved must share one vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmdistill.cli import COMMANDS, build_parser, main


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (to prove nothing was written)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Loading a model or tokenizing data fails the test: the checks must come first."""
    import lmdistill.data
    import lmdistill.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or data tokenized before the options were checked")

    for module, name in ((lmdistill.models, "load_model"), (lmdistill.models, "load_teacher"),
                         (lmdistill.data, "load_examples")):
        monkeypatch.setattr(module, name, refuse)


def _argv(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--max_steps", "2",
            "--batch_size", "4", *map(str, extra)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no usage dump
    return lines[0]


# (extra argv built from tmp_path, exit code, text the error must contain)
BAD_OPTIONS = [
    (lambda t: ["--top_k", "0"], 2, "argument --top_k: expected an integer >= 1, found '0'"),
    (lambda t: ["--alpha", "2"], 2, "argument --alpha: expected a number in [0, 1], found '2'"),
    (lambda t: ["--temperature", "0"], 2, "argument --temperature: expected a number > 0"),
    (lambda t: ["--skew_lambda", "5"], 2, "argument --skew_lambda: expected a number in [0, 1]"),
    (lambda t: ["--jsd_beta", "1"], 2, "argument --jsd_beta: expected a number in (0, 1)"),
    (lambda t: ["--batch_size", "0"], 2, "argument --batch_size: expected an integer >= 1"),
    (lambda t: ["--accumulation_steps", "0"], 2, "argument --accumulation_steps"),
    (lambda t: ["--max_steps", "-1"], 2, "argument --max_steps: expected an integer >= 1, found '-1'"),
    (lambda t: ["--max_steps", "0"], 2, "argument --max_steps: expected an integer >= 1, found '0'"),
    (lambda t: ["--epochs", "0"], 2, "argument --epochs: expected a number > 0"),
    (lambda t: ["--learning_rate", "nan"], 2, "argument --learning_rate"),
    (lambda t: ["--divergence", "kld"], 2, "argument --divergence: invalid choice: 'kld'"),
    (lambda t: ["--learning_rat", "0.1"], 2, "unknown option '--learning_rat' (did you mean --learning_rate?)"),
    (lambda t: ["--top_k", "100000"], 1, "--top_k: expected at most the vocabulary size (320 tokens), found 100000"),
    (lambda t: ["--data", t / "missing.jsonl"], 1, "--data: no such file"),
    (lambda t: ["--data", t / "notes.csv"], 1, "unsupported file type '.csv'"),
    (lambda t: ["--eval_data", t / "missing.jsonl"], 1, "--eval_data: no such file"),
    (lambda t: ["--teacher", t / "runs" / "teachr"], 1, "teachr': no such folder, and not a preset name"),
    (lambda t: ["--student", t / "no_student"], 1, "--student: model"),
    (lambda t: ["--teacher_adapter", t / "no_adapter"], 1, "--teacher_adapter: expected a LoRA adapter folder"),
    (lambda t: ["--teacher_cache", t / "no_cache"], 1, "--teacher_cache: expected a folder made by `lmdistill cache"),
    (lambda t: ["--teacher_weights", "1,2"], 1, "--teacher_weights: expected 1 weights"),
    (lambda t: ["--teacher_weights", "1,-2"], 2, "argument --teacher_weights: expected comma-separated positive"),
    (lambda t: ["--teacher_adapter", t, "--teacher_adapter", t], 1, "--teacher_adapter: expected one per --teacher"),
    (lambda t: ["--teacher_dtype", "float32", "--teacher_dtype", "bfloat16"], 1,
     "--teacher_dtype: expected one (for every teacher) or one per --teacher (1, in the same order), found 2"),
    (lambda t: ["--resume"], 1, "--resume: no complete checkpoint-STEP/ folder"),
    (lambda t: ["--resume", t / "nowhere"], 1, "--resume: expected a checkpoint folder"),
    (lambda t: ["--resume", "--overwrite"], 1, "give one"),
    (lambda t: ["--lora_target_modules", "q_proj"], 1, "--lora_target_modules needs --lora_r"),
    (lambda t: ["--temperature_schedule", "cosine"], 1, "needs --temperature_end"),
    (lambda t: ["--device", "tpu"], 1, "--device: expected cpu, cuda or cuda:N, found 'tpu'"),
    (lambda t: ["--report_to", "swanlab"], 1, "--report_to swanlab: the 'swanlab' package is not installed"),
]


@pytest.mark.parametrize("extra,code,text", BAD_OPTIONS, ids=[" ".join(map(str, b[0](Path("t")))) for b in BAD_OPTIONS])
def test_bad_options_fail_before_any_model_and_write_nothing(extra, code, text, tiny_teacher_dir, tiny_chat, tmp_path,
                                                             nothing_heavy, capsys):
    if "swanlab" in text and _installed("swanlab"):
        pytest.skip("swanlab is installed here")
    (tmp_path / "notes.csv").write_text("a,b\n")
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, *extra(tmp_path))) == code
    assert text in _error_line(capsys)
    assert not out.exists()


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_device_cuda_without_a_gpu_is_an_error(tiny_teacher_dir, tiny_chat, tmp_path, nothing_heavy, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--device", "cuda")) == 1
    assert "--device cuda: no usable CUDA GPU here" in _error_line(capsys)
    assert not out.exists()


def test_missing_required_options_are_named_without_a_traceback(tiny_chat, tmp_path, capsys):
    for command, argv, missing in (("train", ["--model", "nano", "--data", str(tiny_chat)], "--output_dir"),
                                   ("distill", ["--teacher", "x", "--data", str(tiny_chat)], "--student, --output_dir")):
        assert main([command, *argv]) == 2
        assert f"the following arguments are required: {missing}" in _error_line(capsys)
    usage = build_parser("train").format_usage()
    assert "--output_dir OUTPUT_DIR" in usage and "[--output_dir" not in usage  # required in --help too
    assert "--data DATA" in usage and "[--data " not in usage


def test_recipe_values_are_checked_like_flags(tiny_teacher_dir, tiny_chat, tmp_path, nothing_heavy, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {tiny_teacher_dir}\nstudent: nano\ndata: {tiny_chat}\nout_dir: {tmp_path / 'run'}\n"
                      "alpha: 2\n")
    assert main(["distill", "--config", str(recipe)]) == 1
    assert f"{recipe}:5: 'alpha': expected a number in [0, 1], found 2" in _error_line(capsys)
    recipe.write_text(f"teacher: {tiny_teacher_dir}\nlerning_rate: 0.1\n")
    assert main(["distill", "--config", str(recipe)]) == 1
    assert "r.yaml:2: unknown key 'lerning_rate' for this command (did you mean learning_rate?)" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


# -- tokenizers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def foreign_student_dir(tmp_path_factory):
    """A student folder whose tokenizer has the teacher's size (320) but was trained on other text."""
    from transformers import AutoTokenizer

    from lmdistill.models import load_model
    from lmdistill.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("foreign")
    corpus = root / "other.txt"
    corpus.write_text("\n".join(f"zebra {i} quartz {i * 7} jumps over {i % 13} yaks" for i in range(400)) + "\n")
    train_tokenizer([corpus], vocab_size=320, output_dir=root / "tok")
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    model = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=1, verbose=False)
    model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return root / "student"


def test_a_student_folder_with_another_tokenizer_is_refused(tiny_teacher_dir, tiny_chat, foreign_student_dir,
                                                            tmp_path, nothing_heavy, capsys):
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(foreign_student_dir))) == len(
        AutoTokenizer.from_pretrained(str(tiny_teacher_dir)))  # same size: only the vocabularies differ
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(tiny_teacher_dir), "--student", str(foreign_student_dir), "--data",
            str(tiny_chat), "--output_dir", str(out)]
    before = _snapshot(foreign_student_dir)
    assert main(argv) == 1
    line = _error_line(capsys)
    assert f"the tokenizers of --teacher {tiny_teacher_dir} and --student {foreign_student_dir} disagree" in line
    assert "ids mapped differently" in line and "share one vocabulary" in line
    assert not out.exists() and _snapshot(foreign_student_dir) == before
    # --tokenizer against the student folder's own, and `train --model DIR --tokenizer OTHER`
    assert main([*argv[:1], "--tokenizer", str(tiny_teacher_dir), *argv[1:]]) == 1
    assert "disagree" in _error_line(capsys)
    assert main(["train", "--model", str(foreign_student_dir), "--tokenizer", str(tiny_teacher_dir), "--data",
                 str(tiny_chat), "--output_dir", str(out)]) == 1
    assert "the tokenizers of --tokenizer" in _error_line(capsys)


def test_a_cache_tokenizer_is_compared_with_the_student_folder(tiny_teacher_dir, tiny_chat, foreign_student_dir,
                                                               tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(tiny_chat), "--output_dir",
                 str(cache), "--max_seq_len", "64", "--top_k", "8"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["distill", "--teacher_cache", str(cache), "--student", str(foreign_student_dir), "--data",
                 str(tiny_chat), "--output_dir", str(out), "--max_seq_len", "64"]) == 1
    assert f"the tokenizers of --teacher_cache {cache} and --student {foreign_student_dir} disagree" in \
        _error_line(capsys)
    assert not out.exists()


def test_same_vocabulary_with_another_eos_is_accepted(tiny_teacher_dir):
    """Base and instruct models of one family share a vocabulary but not always their eos token."""
    from lmdistill.tokenizer import load_tokenizer, vocabulary_difference

    a, b = load_tokenizer(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    b.eos_token = b.convert_ids_to_tokens(5)
    assert a.eos_token_id != b.eos_token_id
    assert vocabulary_difference(a, b) is None


# -- the run folder ------------------------------------------------------------------------------------------
def test_a_used_run_folder_is_refused_then_overwritten_only_when_asked(tiny_teacher_dir, tiny_chat, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--save_interval", "1")) == 0
    (out / "notes.txt").write_text("mine")
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    capsys.readouterr()
    before = _snapshot(out)
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", "1")) == 1
    line = _error_line(capsys)
    assert f"--output_dir '{out}' holds an earlier run (checkpoint-1/, checkpoint-2/, metrics.jsonl" in line
    assert "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before  # nothing lost
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", "1", "--overwrite")) == 0
    assert not list(out.glob("checkpoint-*"))  # a later --resume cannot pick up the old run's weights
    assert (out / "notes.txt").read_text() == "mine"  # not a run's file: left alone
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


def test_resume_refuses_changed_options_unless_allowed(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", "3", "--save_interval", "2")) == 0
    capsys.readouterr()
    before = _snapshot(out)
    changed = _argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", "3", "--resume", "--divergence", "rkl",
                    "--learning_rate", "1e-3", "--log_interval", "5")
    assert main(changed) == 1
    line = _error_line(capsys)
    assert "--divergence 'forward_kl' -> 'rkl'; --learning_rate 0.0005 -> 0.001." in line  # log_interval is free
    assert "--allow_config_change" in line
    assert _snapshot(out) == before
    assert main([*changed, "--allow_config_change"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_output_dir_may_not_be_an_input(tiny_teacher_dir, tiny_chat, tmp_path, nothing_heavy, capsys):
    before = _snapshot(tiny_teacher_dir)
    assert main(_argv(tiny_teacher_dir, tiny_chat, tiny_teacher_dir, "--overwrite")) == 1
    assert "is also --teacher" in _error_line(capsys)
    assert _snapshot(tiny_teacher_dir) == before


# -- what the user sees --------------------------------------------------------------------------------------
def test_json_errors_read_well(tmp_path, tiny_tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "unterminated')
    assert main(["data", "--data", str(bad), "--tokenizer", str(tiny_tokenizer_dir)]) == 1
    line = _error_line(capsys)
    assert f"{bad}:2: invalid JSON (Unterminated string starting at column 10)" in line and "at at" not in line


def test_help_lists_only_commands_that_exist(capsys):
    assert main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.split("commands:")[1].splitlines()
              if line.startswith("  ")]
    assert listed == list(COMMANDS)
    for command in COMMANDS:
        build_parser(command)  # every listed command imports and declares its options


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_and_its_default(command):
    parser = build_parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"lmdistill {command} {action.option_strings}: no help text"
        if action.option_strings and action.default not in (None, False):
            assert "default" in formatter._get_help_string(action), f"{action.option_strings}: default not shown"


def test_divergence_and_data_format_help_list_their_values():
    from lmdistill.data.formats import FORMATS
    from lmdistill.losses.divergences import DIVERGENCES

    text = build_parser("distill").format_help()
    six = ", ".join(DIVERGENCES)
    assert len(DIVERGENCES) == 6 and six in " ".join(text.split())
    assert "aliases: fkl=forward_kl" in " ".join(text.split())
    assert "{auto," + ",".join(FORMATS) + "}" in text.replace("\n", "").replace(" ", "")


def test_a_cli_run_is_quiet_and_says_what_it_saved(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmdistill", "train", "--model", "nano", "--hidden_size", "32",
                           "--num_layers", "1", "--tokenizer", str(tiny_tokenizer_dir), "--data", str(tiny_corpus),
                           "--output_dir", str(out), "--max_steps", "1", "--max_seq_len", "32", "--batch_size", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = proc.stdout + proc.stderr
    assert "Loading weights" not in both and "Writing model shards" not in both
    assert f"saved the model to {out}" in proc.stdout and "student" not in proc.stdout.splitlines()[-1]


def test_an_error_after_the_models_load_still_writes_nothing(tiny_teacher_dir, tmp_path, capsys):
    """A bad record is found while tokenizing, after the models are built: the run folder is still not made."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"conversations": "not a list"}\n')
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, bad, out)) == 1
    assert f"{bad}:2:" in capsys.readouterr().err
    assert not out.exists()
