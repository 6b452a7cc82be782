"""Does --keep_best rescue distillation from a teacher trained too long on little data? The quickstart's world (data,
tokenizer, evaluation), several seeds.

    python benchmarks/health_seeds.py                       # seeds 0 1 2 -> results/health_seeds.json
    python benchmarks/health_seeds.py --seeds 0 --steps_scale 0.05 --output /tmp/smoke.json      # ~1-2 minutes

Per seed: `pipeline.make_data`, then everything trains on the students' 20% only ("little data"):

    teacher     the quickstart's teacher (256 x 2) for T = the quickstart's teacher steps x --teacher_epochs_factor
                (900 steps, ~15 passes over the 20%: too long), evaluated on a validation split every T / 20 steps
                with --keep_best: its final model is the best evaluation's ...
    teacher_last  ... and the last model of the same run (its checkpoint-T/), what a run without --keep_best exports
    ce          the student (`nano`, 128 x 2) with cross-entropy, S = the quickstart's student steps
    kd_best     the student distilled (forward KL) from `teacher` for S steps
    kd_last     the student distilled from `teacher_last` for S steps (same seed, data, steps)

The validation split (for --keep_best) is taken from the teacher data the 20% left out, so the held-out documents and
questions of the evaluation never choose a model. Evaluation is the quickstart's: held-out perplexity and bits per
byte on documents, exact match on held-out questions (95% Wilson intervals). Nothing else should run on the cores
meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

from seeds import new_record, run_seeds, seed_parser, stats  # benchmarks/seeds.py

ARMS = ("teacher", "teacher_last", "ce", "kd_best", "kd_last")
FOLDERS = {"teacher": "teacher", "teacher_last": "teacher_last", "ce": "student_ce", "kd_best": "student_kd_best",
           "kd_last": "student_kd_last"}


def write_validation(out: Path, records: int) -> Path:
    """`records` teacher-train documents outside the students' 20% (student_train is the first 20% of the shuffled
    teacher_train), as the --keep_best validation data."""
    data = out / "data"
    teacher = data.joinpath("teacher_train.jsonl").read_text().splitlines()
    student = data.joinpath("student_train.jsonl").read_text().splitlines()
    rest = teacher[len(student):]
    path = data / "valid.jsonl"
    path.write_text("".join(line + "\n" for line in rest[:records]))
    return path


def train_arms(out: Path, recipe, seed: int, device: str, factor: float, valid_records: int, clock) -> dict:
    from lmdistill.api import DistillConfig, TrainConfig
    from lmdistill.quickstart import pipeline

    little, valid = out / "data" / "student_train.jsonl", write_validation(out, valid_records)
    teacher_steps = max(2, round(recipe.teacher_steps * factor))
    options = lambda name, steps: pipeline.common_options(recipe, seed, device, steps, little, out / name)  # noqa: E731
    info = {}
    seconds = pipeline.run_training(TrainConfig(
        **options("teacher", teacher_steps), model=recipe.teacher, num_layers=recipe.teacher_layers,
        tokenizer=str(out / "tokenizer"), eval_data=str(valid), eval_interval=max(1, teacher_steps // 20),
        keep_best="ce", keep_checkpoints=1))
    final = [json.loads(x) for x in (out / "teacher" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "final"][-1]
    best_step = final["exported_step"]
    last = out / "teacher" / f"checkpoint-{teacher_steps}"
    (out / "teacher_last").symlink_to(last.resolve())
    clock.say("teacher", f"{teacher_steps} steps on the 20% in {seconds:.1f}s; best validation CE at step {best_step}")
    info["teacher"] = {"arm": "teacher", "train_steps": best_step, "run_steps": teacher_steps,
                       "arm_seconds": round(seconds, 1), "best_step": best_step}
    info["teacher_last"] = {"arm": "teacher_last", "train_steps": teacher_steps, "arm_seconds": 0.0}
    steps = recipe.student_steps
    runs = {"ce": TrainConfig(**options("student_ce", steps), model=recipe.student, tokenizer=str(out / "tokenizer"))}
    for arm, teacher in (("kd_best", out / "teacher"), ("kd_last", out / "teacher_last")):
        runs[arm] = DistillConfig(**options(FOLDERS[arm], steps), teacher=[str(teacher)], student=recipe.student,
                                  divergence=recipe.divergence, temperature=recipe.temperature, alpha=recipe.alpha)
    for arm, config in runs.items():
        seconds = pipeline.run_training(config)
        info[arm] = {"arm": arm, "train_steps": steps, "arm_seconds": round(seconds, 1)}
        clock.say(arm, f"{steps} steps in {seconds:.1f}s")
    return info


def run_seed(seed: int, recipe, work_dir: Path, device: str, factor: float, valid_records: int) -> dict:
    from lmdistill.quickstart import pipeline

    out = work_dir / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    clock = pipeline.Clock()
    load_before = os.getloadavg()[0]
    facts = pipeline.make_data(out, recipe, seed, clock)
    info = train_arms(out, recipe, seed, device, factor, valid_records, clock)
    names = tuple(FOLDERS[a] for a in ARMS)
    with mock.patch.object(pipeline, "MODELS", names):  # KL and agreement are to `teacher` (the best one)
        results = pipeline.evaluate_models(out, recipe, device, clock)
    models = {a: {**{k: v for k, v in results[FOLDERS[a]].items() if k != "samples"}, **info[a]} for a in ARMS}
    return {"seed": seed, "seconds": round(clock(), 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "facts": {k: v for k, v in facts.items() if k != "paths"}, "models": models}


def summarize(runs: list[dict]) -> dict:
    keys = ("ppl", "bits_per_byte", "accuracy")
    out = {a: {k: stats([r["models"][a][k] for r in runs]) for k in keys} for a in ARMS}
    for a, b in (("kd_best", "kd_last"), ("teacher", "teacher_last"), ("kd_best", "ce")):
        out[f"{a}_minus_{b}"] = {k: stats([r["models"][a][k] - r["models"][b][k] for r in runs]) for k in keys}
    out["best_step"] = stats([r["models"]["teacher"]["best_step"] for r in runs])
    return out


def table(summary: dict) -> str:
    lines = [f"{'arm':<13} {'ppl':>16} {'bits/byte':>18} {'exact match':>16}"]
    for a in ARMS:
        s = summary[a]
        ppl, bpb, acc = s["ppl"], s["bits_per_byte"], s["accuracy"]
        lines.append(f"{a:<13} {ppl['mean']:>8.3f} +- {ppl['std']:<5.3f} {bpb['mean']:>8.4f} +- {bpb['std']:<6.4f} "
                     f"{acc['mean']:>7.1%} +- {acc['std']:<5.1%}")
    for key in ("kd_best_minus_kd_last", "teacher_minus_teacher_last", "kd_best_minus_ce"):
        d = summary[key]
        lines.append(f"{key.replace('_minus_', ' - ')}: ppl {d['ppl']['mean']:+.3f} ({d['ppl']['min']:+.3f}.."
                     f"{d['ppl']['max']:+.3f}), bits/byte {d['bits_per_byte']['mean']:+.4f}, exact match "
                     f"{d['accuracy']['mean']:+.1%} ({d['accuracy']['min']:+.1%}..{d['accuracy']['max']:+.1%})")
    lines.append(f"teacher's best step: mean {summary['best_step']['mean']:.0f} "
                 f"({summary['best_step']['min']:.0f}..{summary['best_step']['max']:.0f})")
    return "\n".join(lines)


def main() -> int:
    parser = seed_parser(__doc__, "health_seeds")
    parser.add_argument("--teacher_epochs_factor", type=float, default=1.0,
                        help="teacher steps = the quickstart's teacher steps (scaled) x this")
    parser.add_argument("--valid_records", type=int, default=200, help="validation documents for --keep_best")
    args = parser.parse_args()

    from lmdistill.quickstart.pipeline import Recipe

    recipe = Recipe().scaled(args.steps_scale)
    record = new_record("health_seeds.py", f"--seeds {' '.join(map(str, args.seeds))} --steps_scale "
                        f"{args.steps_scale:g} --teacher_epochs_factor {args.teacher_epochs_factor:g} --valid_records "
                        f"{args.valid_records} --device {args.device}", recipe)
    run_seeds(record, args.seeds, lambda seed: run_seed(seed, recipe, Path(args.work_dir), args.device,
                                                         args.teacher_epochs_factor, args.valid_records),
              summarize, Path(args.output))
    print(table(record["summary"]))
    print(f"wrote {args.output} ({record['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
