"""Do hidden-state and progressive distillation help? The quickstart's world (data, tokenizer, teacher,
evaluation), the same student trained several ways at equal student steps, three seeds.

    python benchmarks/feature_progressive_seeds.py          # seeds 0 1 2 -> results/feature_progressive_seeds.json
    python benchmarks/feature_progressive_seeds.py --seeds 0 --steps_scale 0.05 --output /tmp/smoke.json

Per seed: `pipeline.make_data`, `pipeline.train_models` (the quickstart's teacher -- micro's width with 2 layers,
256 x 2 -- its CE student and its forward-KL student, `nano` 128 x 2, S = 400 steps on the same 20%), then:

    feat_cos   the KD student plus `--feature_loss cosine --feature_weight 1` (layer map auto: 0:0, 1:1)
    feat_mse   the KD student plus `--feature_loss mse --feature_weight F` (F = --mse_weight, default 0.1)
    prog       `--via MIDDLE --stage_steps S,S`: the teacher distilled into a 192 x 2 model built from a config
               (random init, same seed) for S steps, then that model into the student for S steps (forward KL)

Every student arm trains the `nano` student for the same S steps with the same batch, learning rate, warmup and
seed; prog's middle stage is extra compute, reported in seconds. Evaluation is the quickstart's: held-out
perplexity on documents and exact match on held-out questions (95% Wilson intervals), plus bits per byte.
Nothing else should run on the cores meanwhile.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from unittest import mock

from seeds import new_record, run_seeds, seed_parser, stats  # benchmarks/seeds.py

ARMS = ("ce", "kd", "feat_cos", "feat_mse", "prog")
MIDDLE = {"hidden_size": 192, "num_layers": 2}


def build_middle(out: Path, seed: int) -> Path:
    """The progressive arm's intermediate model: a random 192 x 2 model saved as a folder (an initial checkpoint)."""
    import torch

    from lmdistill.models import load_model
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    model = load_model("nano", tokenizer=tok, verbose=False, **MIDDLE)
    folder = out / "middle_init"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_arms(out: Path, recipe, seed: int, device: str, mse_weight: float, clock) -> dict[str, dict]:
    from lmdistill.api import DistillConfig, distill
    from lmdistill.quickstart import pipeline

    info = pipeline.train_models(out, recipe, seed, device, clock)
    for arm, name in (("teacher", "teacher"), ("ce", "student_ce"), ("kd", "student_kd")):
        info[name].update(arm=arm, arm_seconds=info[name]["train_seconds"])
    steps, data = recipe.student_steps, out / "data" / "student_train.jsonl"
    kd = dict(teacher=[str(out / "teacher")], student=recipe.student, divergence=recipe.divergence,
              temperature=recipe.temperature, alpha=recipe.alpha)
    options = lambda name: pipeline.common_options(recipe, seed, device, steps, data, out / name)  # noqa: E731
    for arm, extra in (("feat_cos", dict(feature_loss="cosine", feature_weight=1.0)),
                       ("feat_mse", dict(feature_loss="mse", feature_weight=mse_weight))):
        seconds = pipeline.run_training(DistillConfig(**options(f"student_{arm}"), **kd, **extra))
        info[f"student_{arm}"] = {"arm": arm, "train_steps": steps, "train_seconds": round(seconds, 1),
                                  "arm_seconds": round(seconds, 1), **extra}
        clock.say(arm, f"trained in {seconds:.1f}s")
    middle = build_middle(out, seed)
    start = time.perf_counter()
    distill(DistillConfig(**options("student_prog"), **kd | {"student": recipe.student}, via=[str(middle)],
                          stage_steps=[steps, steps]))
    seconds = time.perf_counter() - start
    info["student_prog"] = {"arm": "prog", "train_steps": steps, "middle_steps": steps, "middle": MIDDLE,
                            "train_seconds": round(seconds, 1), "arm_seconds": round(seconds, 1)}
    clock.say("prog", f"teacher -> 192 x 2 -> student, {steps} + {steps} steps in {seconds:.1f}s")
    return info


def run_seed(seed: int, recipe, work_dir: Path, device: str, mse_weight: float) -> dict:
    from lmdistill.quickstart import pipeline

    out = work_dir / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    clock = pipeline.Clock()
    load_before = os.getloadavg()[0]
    facts = pipeline.make_data(out, recipe, seed, clock)
    info = train_arms(out, recipe, seed, device, mse_weight, clock)
    names = ("teacher", *(f"student_{a}" for a in ARMS))
    with mock.patch.object(pipeline, "MODELS", names):
        results = pipeline.evaluate_models(out, recipe, device, clock)
    models = {info[n]["arm"]: {**{k: v for k, v in results[n].items() if k != "samples"}, **info[n]} for n in names}
    return {"seed": seed, "seconds": round(clock(), 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "facts": {k: v for k, v in facts.items() if k != "paths"}, "models": models}


def summarize(runs: list[dict]) -> dict:
    keys = ("ppl", "bits_per_byte", "accuracy", "arm_seconds")
    out = {m: {k: stats([r["models"][m][k] for r in runs]) for k in keys} for m in ("teacher", *ARMS)}
    for arm in ("feat_cos", "feat_mse", "prog"):
        out[f"{arm}_minus_kd"] = {k: stats([r["models"][arm][k] - r["models"]["kd"][k] for r in runs])
                                  for k in ("ppl", "bits_per_byte", "accuracy")}
    return out


def table(runs: list[dict], summary: dict) -> str:
    lines = [f"{'arm':<9} {'ppl':>14} {'bits/byte':>16} {'exact match':>16} {'seconds':>8}"]
    for m in ("teacher", *ARMS):
        s = summary[m]
        lines.append(f"{m:<9} {s['ppl']['mean']:>7.3f} +- {s['ppl']['std']:<5.3f} {s['bits_per_byte']['mean']:>7.4f} +- "
                     f"{s['bits_per_byte']['std']:<6.4f} {s['accuracy']['mean']:>7.1%} +- {s['accuracy']['std']:<5.1%} "
                     f"{s['arm_seconds']['mean']:>7.0f}")
    for arm in ("feat_cos", "feat_mse", "prog"):
        d = summary[f"{arm}_minus_kd"]
        lines.append(f"{arm} - kd: ppl {d['ppl']['mean']:+.3f} ({d['ppl']['min']:+.3f}..{d['ppl']['max']:+.3f}), "
                     f"bits/byte {d['bits_per_byte']['mean']:+.4f}, exact match {d['accuracy']['mean']:+.1%} "
                     f"({d['accuracy']['min']:+.1%}..{d['accuracy']['max']:+.1%})")
    return "\n".join(lines)


def main() -> int:
    parser = seed_parser(__doc__, "feature_progressive_seeds")
    parser.add_argument("--mse_weight", type=float, default=0.1, help="--feature_weight of the feat_mse arm")
    args = parser.parse_args()

    from lmdistill.quickstart.pipeline import Recipe

    recipe = Recipe().scaled(args.steps_scale)
    record = new_record("feature_progressive_seeds.py", f"--seeds {' '.join(map(str, args.seeds))} --steps_scale "
                        f"{args.steps_scale:g} --mse_weight {args.mse_weight:g} --device {args.device}", recipe)
    run_seeds(record, args.seeds, lambda seed: run_seed(seed, recipe, Path(args.work_dir), args.device,
                                                         args.mse_weight), summarize, Path(args.output))
    print(table(record["runs"], record["summary"]))
    print(f"wrote {args.output} ({record['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
