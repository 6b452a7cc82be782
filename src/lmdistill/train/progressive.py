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

import argparse
import copy
import json
import re
from pathlib import Path

from lmdistill.errors import LmdistillError

DONE_FILE = "stage_done.json"


def stage_name(ref: str) -> str:
    """A folder-safe name for a --via: the preset name or the folder's name."""
    name = Path(ref.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plan_stages(args: argparse.Namespace) -> list[dict]:
    """[{teacher, student, output_dir, max_steps, final}] from the run's options (checked before anything runs)."""
    from lmdistill.models.loading import check_model_ref

    vias, out = list(args.via), Path(args.output_dir)
    if args.teacher_cache or len(args.teacher or []) != 1:
        raise LmdistillError("--via: progressive distillation starts from one online --teacher (found "
                             f"{len(args.teacher or [])} --teacher and {len(args.teacher_cache or [])} --teacher_cache); "
                             "each later stage's teacher is the previous stage's model.")
    for via in vias:
        check_model_ref("--via", via)
    n = len(vias) + 1
    steps = args.stage_steps or [args.max_steps] * n
    if len(steps) != n:
        raise LmdistillError(f"--stage_steps: expected {n} step counts (one per stage: {len(vias)} --via, then the "
                             f"student), found {len(steps)}.")
    stages, teacher = [], args.teacher[0]
    for i, via in enumerate(vias, 1):
        folder = out / f"stage-{i}-{stage_name(via)}"
        stages.append({"teacher": teacher, "student": via, "output_dir": folder, "max_steps": steps[i - 1],
                       "final": False})
        teacher = str(folder)
    stages.append({"teacher": teacher, "student": args.student, "output_dir": out, "max_steps": steps[-1],
                   "final": True})
    return stages


def stage_args(args: argparse.Namespace, stage: dict, index: int) -> argparse.Namespace:
    """The options of one stage: the run's, with this stage's teacher, student, folder and steps."""
    a = copy.copy(args)
    a.via, a.stage_steps = None, None
    a.teacher, a.student, a.output_dir, a.max_steps = [stage["teacher"]], stage["student"], str(stage["output_dir"]), \
        stage["max_steps"]
    if index > 0:  # the first teacher's adapter and dtype belong to it; later teachers are the stages' models
        a.teacher_adapter, a.teacher_dtype = None, None
    if not stage["final"]:
        a.hidden_size = a.num_layers = a.use_moe = None
    folder = Path(stage["output_dir"])
    a.overwrite, a.resume = False, None
    if args.resume:
        from lmdistill.train import state as ckpt

        if ckpt.list_checkpoints(folder):
            a.resume = "latest"
        else:
            a.overwrite = True  # an interrupted stage that saved nothing starts again
    return a


def run_progressive(args: argparse.Namespace) -> int:
    from lmdistill.train import preflight
    from lmdistill.train.loop import run_training

    stages = plan_stages(args)
    out = Path(args.output_dir)
    if args.resume and args.overwrite:
        raise LmdistillError("--resume continues the run in --output_dir and --overwrite deletes it: give one.")
    old = preflight.run_outputs(out)
    if old and not (args.resume or args.overwrite):
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old[:6])
        raise LmdistillError(f"--output_dir '{out}' holds an earlier run ({shown}). Pass --resume to continue it, "
                             "--overwrite to delete it and start anew, or choose another --output_dir.")
    if args.overwrite:
        preflight.remove_outputs(old)
    for i, stage in enumerate(stages):
        label = f"stage {i + 1}/{len(stages)}: {stage['teacher']} -> {stage['student']}"
        done = Path(stage["output_dir"]) / DONE_FILE
        if done.is_file() and args.resume:
            print(f"{label}: finished earlier ({stage['output_dir']}), skipped")
            continue
        print(f"{label} -> {stage['output_dir']}", flush=True)
        code = run_training(stage_args(args, stage, i))
        if code:
            return code
        done.write_text(json.dumps({"stage": i + 1, "teacher": stage["teacher"], "student": stage["student"],
                                    "max_steps": stage["max_steps"]}) + "\n")
    return 0
