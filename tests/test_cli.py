"""The CLI framework: dispatch, YAML recipes under flags, unknown keys as clean errors."""

import argparse
import subprocess
import sys

import pytest

from lmdistill.cli import main
from lmdistill.config import parse_command_args
from lmdistill.errors import LmdistillError


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", "--out_dir", dest="output_dir", default="out")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--divergence", choices=["forward_kl", "reverse_kl"], default="forward_kl")
    return p


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("out_dir: from_yaml\nlearning_rate: 0.5\n")
    args = parse_command_args(_parser(), ["--config", str(cfg), "--learning_rate", "0.25"])
    assert args.output_dir == "from_yaml"
    assert args.learning_rate == 0.25


def test_unknown_yaml_key_names_file_and_line(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("learning_rate: 0.5\nlerning_rate: 0.1\n")
    with pytest.raises(LmdistillError, match=r"r\.yaml:2: unknown key 'lerning_rate'"):
        parse_command_args(_parser(), ["--config", str(cfg)])


def test_bad_choice_in_yaml(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("divergence: kl\n")
    with pytest.raises(LmdistillError, match="must be one of"):
        parse_command_args(_parser(), ["--config", str(cfg)])


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_command_args(_parser(), ["--nope", "1"])
    assert "--nope" in capsys.readouterr().err


def test_main_lists_commands_and_rejects_unknown(capsys):
    assert main([]) == 0
    assert "distill" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "lmdistill", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lmdistill ")
