"""A `train`/`distill` run from its typed options: the one entry point of the commands and the Python API.

    code = run_command(DistillConfig(...).values(), "distill")

`--dry_run` prints the memory plan and exits; `--via` runs progressive stages, each a run of its own; otherwise
the options are checked into a plan (`preflight.check`) and trained (`loop.run_training`).
"""

from __future__ import annotations

from typing import Any, Mapping

from lmdistill.errors import LmdistillError


def run_command(values: Mapping[str, Any], command: str) -> int:
    from lmdistill.train import preflight
    from lmdistill.train.loop import run_training

    if values["dry_run"]:
        from lmdistill.train.estimate import dry_run

        return dry_run(values, command)
    if command == "distill" and values["via"]:
        from lmdistill.train.progressive import run_progressive

        return run_progressive(values, lambda stage: run_training(preflight.check(stage, "distill")))
    if command == "distill" and values["stage_steps"]:
        raise LmdistillError("--stage_steps: gives the steps of progressive stages; it needs --via.")
    return run_training(preflight.check(values, command))
