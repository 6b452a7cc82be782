"""Progressive distillation: teacher -> intermediate model(s) -> student, as successive runs in one command
(teacher-assistant distillation, Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant").

    lmdistill distill --teacher BIG --via MID [--via MID2 ...] --student SMALL --output_dir OUT [--stage_steps 300,200]

Stage i distills the previous model into the i-th `--via` (a preset name: a new model; a folder: an initial
checkpoint) in `OUT/stage-i-NAME/`, a normal run folder; the last stage distills the last intermediate into
--student in OUT itself, so the final student lands where a one-hop run puts it. Every stage uses the run's
options (loss, data, batch, schedule, eval), with its own steps: `--stage_steps` (one per stage, the final one
last; default each stage gets the run's --max_steps or --epochs). Model-size overrides (--hidden_size,
--num_layers, --use_moe) apply to the final student only. A stage that finished leaves `stage_done.json`;
`--resume` skips finished stages and continues the unfinished one from its last checkpoint (or starts it anew
when it saved none). `lmdistill report OUT` shows every stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from lmdistill.errors import LmdistillError

DONE_FILE = "stage_done.json"


def stage_name(ref: str) -> str:
    """A folder-safe name for a --via: the preset name or the folder's name."""
    name = Path(ref.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plan_stages(values: Mapping[str, Any]) -> list[dict]:
    """[{teacher, student, output_dir, max_steps, final}] from the run's options (checked before anything runs)."""
    from lmdistill.models.loading import check_model_ref

    vias, out = list(values["via"]), Path(values["output_dir"])
    teachers, caches = values["teacher"] or [], values["teacher_cache"] or []
    if caches or len(teachers) != 1:
        raise LmdistillError("--via: progressive distillation starts from one online --teacher (found "
                             f"{len(teachers)} --teacher and {len(caches)} --teacher_cache); each later stage's "
                             "teacher is the previous stage's model.")
    for via in vias:
        check_model_ref("--via", via)
    n = len(vias) + 1
    steps = values["stage_steps"] or [values["max_steps"]] * n
    if len(steps) != n:
        raise LmdistillError(f"--stage_steps: expected {n} step counts (one per stage: {len(vias)} --via, then the "
                             f"student), found {len(steps)}.")
    stages, teacher = [], teachers[0]
    for i, via in enumerate(vias, 1):
        folder = out / f"stage-{i}-{stage_name(via)}"
        stages.append({"teacher": teacher, "student": via, "output_dir": folder, "max_steps": steps[i - 1],
                       "final": False})
        teacher = str(folder)
    stages.append({"teacher": teacher, "student": values["student"], "output_dir": out, "max_steps": steps[-1],
                   "final": True})
    return stages


def stage_values(values: Mapping[str, Any], stage: dict, index: int) -> dict:
    """The options of one stage: the run's, with this stage's teacher, student, folder and steps."""
    v = dict(values)
    v.update(via=None, stage_steps=None, teacher=[stage["teacher"]], student=stage["student"],
             output_dir=str(stage["output_dir"]), max_steps=stage["max_steps"])
    if index > 0:  # the first teacher's adapter and dtype belong to it; later teachers are the stages' models
        v.update(teacher_adapter=None, teacher_dtype=None)
    if not stage["final"]:
        v.update(hidden_size=None, num_layers=None, use_moe=None)
    v.update(overwrite=False, resume=None)
    if values["resume"]:
        from lmdistill.train import state as ckpt

        if ckpt.list_checkpoints(Path(stage["output_dir"])):
            v["resume"] = "latest"
        else:
            v["overwrite"] = True  # an interrupted stage that saved nothing starts again
    return v


def check_folder(values: Mapping[str, Any]) -> list[Path]:
    """What an earlier run left in --output_dir, refused unless --resume or --overwrite (then to delete)."""
    from lmdistill.train import preflight

    out = Path(values["output_dir"])
    if values["resume"] and values["overwrite"]:
        raise LmdistillError("--resume continues the run in --output_dir and --overwrite deletes it: give one.")
    old = preflight.run_outputs(out)
    if old and not (values["resume"] or values["overwrite"]):
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old[:6])
        raise LmdistillError(f"--output_dir '{out}' holds an earlier run ({shown}). Pass --resume to continue it, "
                             "--overwrite to delete it and start anew, or choose another --output_dir.")
    return old


def run_progressive(values: Mapping[str, Any], run_stage: Callable[[dict], int]) -> int:
    """Each stage in turn: `run_stage(stage_values)` checks and runs one (`lmdistill.train.run`)."""
    from lmdistill.train import preflight

    stages = plan_stages(values)
    old = check_folder(values)
    if values["overwrite"]:
        preflight.remove_outputs(old)
    for i, stage in enumerate(stages):
        label = f"stage {i + 1}/{len(stages)}: {stage['teacher']} -> {stage['student']}"
        done = Path(stage["output_dir"]) / DONE_FILE
        if done.is_file() and values["resume"]:
            print(f"{label}: finished earlier ({stage['output_dir']}), skipped")
            continue
        print(f"{label} -> {stage['output_dir']}", flush=True)
        code = run_stage(stage_values(values, stage, i))
        if code:
            return code
        done.write_text(json.dumps({"stage": i + 1, "teacher": stage["teacher"], "student": stage["student"],
                                    "max_steps": stage["max_steps"]}) + "\n")
    return 0
