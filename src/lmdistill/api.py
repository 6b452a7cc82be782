"""The Python API: the same options as the command line, as typed config objects.

    from lmdistill import DistillConfig, distill
    out = distill(DistillConfig(teacher=["runs/teacher"], student="nano", data="train.jsonl",
                                output_dir="runs/kd", max_steps=200, divergence="reverse_kl"))

`TrainConfig` / `DistillConfig` / `CacheTeacherConfig` are dataclasses generated from the one declaration of each
option (its flag, type, default and help, in the command's module), so the CLI, recipe YAMLs and Python share
names, defaults and checks: every value goes through the flag's own type, range and choices, and the run through
the same pre-flight checks (`lmdistill.train.preflight`). Repeatable flags (`teacher`, `teacher_cache`,
`teacher_adapter`) take lists. `help(DistillConfig)` lists every field with its help.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lmdistill.errors import LmdistillError

_SKIP = ("help", "config")


def _actions(command: str) -> list[argparse.Action]:
    from lmdistill.cli import build_parser

    return [a for a in build_parser(command)._actions if a.dest not in _SKIP and a.option_strings]


def _config_class(command: str, name: str) -> type:
    actions = _actions(command)
    fields = [(a.dest, Any, dataclasses.field(default=a.default, metadata={"help": a.help or ""})) for a in actions]
    doc = f"Options of `lmdistill {command}` (see `lmdistill {command} --help`):\n\n" + "\n".join(
        f"    {a.dest} = {a.default!r}: {a.help}" for a in actions)
    cls = dataclasses.make_dataclass(name, fields, namespace={"__doc__": doc, "command": command})
    cls.__module__ = __name__
    return cls


TrainConfig = _config_class("train", "TrainConfig")
DistillConfig = _config_class("distill", "DistillConfig")
CacheTeacherConfig = _config_class("cache-teacher", "CacheTeacherConfig")


def to_args(config) -> argparse.Namespace:
    """A config object -> the options namespace the commands run on, checked like flags."""
    from lmdistill.cli import build_parser
    from lmdistill.config import check_values

    command, name = config.command, type(config).__name__
    parser = build_parser(command)
    given = {k: v for k, v in dataclasses.asdict(config).items()}
    values = check_values(parser, given, lambda key: f"{name}.{key}")
    missing = [a.dest for a in parser._actions if a.required and values.get(a.dest) is None]
    if missing:
        raise LmdistillError(f"{name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required.")
    return argparse.Namespace(**values, config=None, command=command)


def _run(config, expected: type) -> Path:
    if not isinstance(config, expected):
        raise LmdistillError(f"expected a {expected.__name__}, found {type(config).__name__}.")
    args = to_args(config)
    if config.command == "cache-teacher":
        from lmdistill.teachers.cli import run

        run(args)
    else:
        from lmdistill.train.cli import run

        code = run(args)  # one run, or the stages of a progressive one (`via`)
        if code:
            raise KeyboardInterrupt(f"the run stopped before its last step (exit status {code}); resume it with "
                                    "resume='latest'.")
    return Path(args.output_dir)


def train(config: TrainConfig) -> Path:
    """Train with cross-entropy (`lmdistill train`); returns the run folder."""
    return _run(config, TrainConfig)


def distill(config: DistillConfig) -> Path:
    """Distill a teacher (or an ensemble, or a cache) into a student (`lmdistill distill`); returns the run folder."""
    return _run(config, DistillConfig)


def cache_teacher(config: CacheTeacherConfig) -> Path:
    """Precompute a teacher's top-k to disk (`lmdistill cache-teacher`); returns the cache folder."""
    return _run(config, CacheTeacherConfig)
