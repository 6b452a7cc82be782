"""The Python API: the same options as the command line, as typed config objects.

    from lmdistill import DistillConfig, distill
    out = distill(DistillConfig(teacher=["runs/teacher"], student="nano", data="train.jsonl",
                                output_dir="runs/kd", max_steps=200, divergence="reverse_kl"))

`TrainConfig` / `DistillConfig` / `CacheTeacherConfig` are dataclasses made from the one declaration of each
option (its flag, type, default and help: `lmdistill.train.options`, `lmdistill.teachers.options`), so the CLI,
recipe YAMLs and Python share names, defaults and checks. A config checks what it is given when it is made: an
unknown keyword names the closest option, a value goes through the flag's own type, range and choices. The run
goes through the same pre-flight checks as the CLI (`lmdistill.train.preflight`), which resolve it into a frozen
plan (`plan(config)` shows it). Repeatable flags (`teacher`, `teacher_cache`, `teacher_adapter`) take lists.
`help(DistillConfig)` lists every field with its help. Teacher kinds and batch sources registered later (plugins)
add their options to `DistillConfig`.
"""

from __future__ import annotations

from pathlib import Path

from lmdistill.errors import LmdistillError

_CONFIGS = {"TrainConfig": "train", "DistillConfig": "distill"}


def __getattr__(name: str):
    """`TrainConfig` / `DistillConfig` as the registries of teacher kinds and batch sources stand now."""
    if name in _CONFIGS:
        from lmdistill.train.options import config_for

        return config_for(_CONFIGS[name])
    if name == "CacheTeacherConfig":
        from lmdistill.teachers.options import config_for

        return config_for()
    raise AttributeError(f"module 'lmdistill.api' has no attribute '{name}'")


def _check(config, expected: str) -> dict:
    """The config's checked values (`ConfigBase.values()`), after checking it is a config of `expected`."""
    from lmdistill.config import ConfigBase

    if not isinstance(config, ConfigBase) or type(config).__name__ != expected:
        raise LmdistillError(f"expected a {expected}, found {type(config).__name__}.")
    return config.values()


def _quiet():
    """transformers' own progress bars ("Loading weights", "Writing model shards") would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def plan(config):
    """The frozen `RunPlan` a `TrainConfig` / `DistillConfig` resolves to (every check that needs no model)."""
    from lmdistill.train import preflight

    return preflight.check(_check(config, type(config).__name__), config.command)


def _run(config, expected: str) -> Path:
    from lmdistill.train.run import run_command

    values = _check(config, expected)
    _quiet()
    code = run_command(values, config.command)  # one run, or the stages of a progressive one (`via`)
    if code:
        raise KeyboardInterrupt(f"the run stopped before its last step (exit status {code}); resume it with "
                                "resume='latest'.")
    return Path(values["output_dir"])


def train(config) -> Path:
    """Train with cross-entropy (`lmdistill train`) from a `TrainConfig`; returns the run folder."""
    return _run(config, "TrainConfig")


def distill(config) -> Path:
    """Distill a teacher (or an ensemble, or a cache) into a student (`lmdistill distill`) from a `DistillConfig`;
    returns the run folder."""
    return _run(config, "DistillConfig")


def cache_teacher(config) -> Path:
    """Precompute a teacher's top-k to disk (`lmdistill cache-teacher`) from a `CacheTeacherConfig`; returns the
    cache folder."""
    from lmdistill.teachers.cache_run import cache_teacher as run

    _check(config, "CacheTeacherConfig")
    _quiet()
    return run(config)
