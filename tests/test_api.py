"""The Python API: config objects generated from the CLI's own option declarations, checked like flags."""

from __future__ import annotations

import dataclasses

import pytest

from lmdistill import DistillConfig, distill
from lmdistill.api import TrainConfig, train
from lmdistill.cli import build_parser, parse_args
from lmdistill.errors import LmdistillError


@pytest.mark.parametrize("cls", [DistillConfig, TrainConfig])
def test_config_fields_are_the_cli_options(cls):
    parser = build_parser(cls.command)
    options = {a.dest: a.default for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert fields == options


def test_distill_from_python_equals_the_cli_options(tiny_teacher_dir, tiny_chat, tmp_path, capfd):
    config = DistillConfig(teacher=[str(tiny_teacher_dir)], student="nano", hidden_size=32, num_layers=1,
                           data=str(tiny_chat), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4,
                           max_seq_len=48, alpha=0.25)
    cli = parse_args("distill", ["--teacher", str(tiny_teacher_dir), "--student", "nano", "--hidden_size", "32",
                                 "--num_layers", "1", "--data", str(tiny_chat), "--output_dir", str(tmp_path / "run"),
                                 "--max_steps", "2", "--batch_size", "4", "--max_seq_len", "48", "--alpha", "0.25"])
    assert config.values() == {k: v for k, v in vars(cli).items() if k not in ("config", "command")}
    out = distill(config)
    assert out == tmp_path / "run" and (out / "model.safetensors").is_file()
    both = "".join(capfd.readouterr())
    assert "Writing model shards" not in both and "Loading weights" not in both  # transformers' bars, as in the CLI


def test_bad_values_and_missing_options_are_named(tiny_chat, tmp_path):
    with pytest.raises(LmdistillError, match=r"^DistillConfig: 'alpha': expected a number in \[0, 1\], found 2"):
        DistillConfig(student="nano", data=str(tiny_chat), output_dir=str(tmp_path), alpha=2)  # on construction
    with pytest.raises(LmdistillError, match=r"DistillConfig: unknown option 'learnign_rate' \(did you mean "
                                             r"learning_rate\?\)"):
        DistillConfig(learnign_rate=1e-3)
    config = DistillConfig(student="nano", data=str(tiny_chat), output_dir=str(tmp_path))
    config.alpha = 3  # assigned later: checked when it runs
    with pytest.raises(LmdistillError, match=r"DistillConfig: 'alpha': expected a number in \[0, 1\], found 3"):
        distill(config)
    with pytest.raises(LmdistillError, match=r"TrainConfig: model, data, output_dir are required"):
        train(TrainConfig())
    with pytest.raises(LmdistillError, match="expected a DistillConfig, found TrainConfig"):
        distill(TrainConfig())
