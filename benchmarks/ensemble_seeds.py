"""Does distilling from a teacher ensemble beat distilling from either teacher alone (issue 10)? BabyLlama
(Timiryasov & Tastet 2023, "Baby Llama: knowledge distillation from an ensemble of teachers") distills a small
student from the averaged logits of two teachers of different architectures (GPT-2 705M, LLaMA 360M) trained on
the same 10M words, and reports the student beating both. This is the same experiment at CPU scale, in the
quickstart's world (`lmdistill.quickstart`: its data, tokenizer, students, steps and evaluation), on 3 seeds.

    python benchmarks/ensemble_seeds.py               # seeds 0 1 2 -> benchmarks/results/ensemble_seeds.json
    python benchmarks/ensemble_seeds.py --seeds 0 --steps_scale 0.05 --output /tmp/ens_smoke.json   # smoke
    python benchmarks/ensemble_seeds.py --arms teacher_a teacher_b student_ce kd_a kd_b              # no ensemble

Per seed, with the quickstart's data and tokenizer for that seed:

    teacher_a   `lmdistill train`: the quickstart's teacher, Qwen3 (q/k norm) 256 x 2, all the training data
    teacher_b   `lmdistill train`: Qwen3 192 x 3 (`micro --hidden_size 192 --num_layers 3`): narrower and deeper,
                1.57M parameters to A's 1.85M, same data, steps and seed; held-out perplexity 3.15 to A's 3.11,
                exact match lower (61% to 85%). BabyLlama's teachers differ in family too, but the Llama shapes
                tried (minimind2 family, no q/k norm: 192 x 4, 256 x 3) were far weaker at this learning rate and
                step count: seed-0 perplexity 3.54 and 4.26, exact match 31% and 3%, to A's 3.14 and 79%
    student_ce  `lmdistill train`: nano (128 x 2), cross-entropy on the students' 20%
    kd_a, kd_b  `lmdistill distill`: nano, forward KL (T 1, alpha 0) to teacher_a / teacher_b
    ens_logits  `lmdistill distill --teacher A --teacher B --ensemble logits`: to the mean of the teachers' logits
                (BabyLlama's ensemble)
    ens_probs   `... --ensemble probs`: to the mean of their probability distributions

All students have the same size, data, steps, seed and options (equal budget in optimizer steps and tokens; an
ensemble student spends more time, two teacher forwards per step). Every model is evaluated as the quickstart does:
held-out CE / perplexity / bits per byte and exact match on the held-out questions (Wilson 95% interval). The
teachers' ensembles themselves are scored on the held-out text too (`ensemble_teachers`), to show what target the
ensemble students were given. About 5 minutes per seed on 2 quiet cores (the fastest time of each arm over the 3
seeds of the recorded run); run it alone: beside another torch job the recorded run took 9-14 minutes a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ARMS = ("teacher_a", "teacher_b", "student_ce", "kd_a", "kd_b", "ens_logits", "ens_probs")
TEACHER_B = ["--model", "micro", "--hidden_size", "192", "--num_layers", "3"]
DESCRIPTIONS = {
    "teacher_a": "teacher A: Qwen3 256 x 2 (the quickstart's), all data",
    "teacher_b": "teacher B: Qwen3 192 x 3, all data",
    "student_ce": "student, cross-entropy only (nano 128 x 2, 20%)",
    "kd_a": "student, KD from teacher A",
    "kd_b": "student, KD from teacher B",
    "ens_logits": "student, KD from ensemble (mean logits)",
    "ens_probs": "student, KD from ensemble (mean probs)",
}


def common_flags(recipe, seed: int, device: str, steps: int, data: Path, out: Path) -> list[str]:
    """The options every quickstart run shares, as `lmdistill train/distill` flags."""
    return ["--data", str(data), "--output_dir", str(out), "--max_steps", str(steps),
            "--batch_size", str(recipe.batch_size), "--max_seq_len", str(recipe.max_seq_len),
            "--learning_rate", str(recipe.learning_rate), "--warmup_iters", str(recipe.warmup_iters),
            "--seed", str(seed), "--device", device, "--log_interval", str(max(1, steps // 40))]


def run_argv(arm: str, out: Path, recipe, seed: int, device: str) -> tuple[str, int, list[str]]:
    """(command, steps, argv) of one arm: the flags a user would type, so the JSON records runnable commands."""
    data, tok = out / "data", str(out / "tokenizer")
    kd = ["--student", recipe.student, "--divergence", recipe.divergence, "--temperature", str(recipe.temperature),
          "--alpha", str(recipe.alpha)]
    teachers = {"a": ["--teacher", str(out / "teacher_a")], "b": ["--teacher", str(out / "teacher_b")]}
    command, extra = {
        "teacher_a": ("train", ["--model", recipe.teacher, "--num_layers", str(recipe.teacher_layers)]),
        "teacher_b": ("train", TEACHER_B),
        "student_ce": ("train", ["--model", recipe.student]),
        "kd_a": ("distill", teachers["a"] + kd),
        "kd_b": ("distill", teachers["b"] + kd),
        "ens_logits": ("distill", teachers["a"] + teachers["b"] + kd + ["--ensemble", "logits"]),
        "ens_probs": ("distill", teachers["a"] + teachers["b"] + kd + ["--ensemble", "probs"]),
    }[arm]
    is_teacher = arm.startswith("teacher")
    steps = recipe.teacher_steps if is_teacher else recipe.student_steps
    path = data / ("teacher_train.jsonl" if is_teacher else "student_train.jsonl")
    if command == "train":
        extra = extra + ["--tokenizer", tok]
    return command, steps, common_flags(recipe, seed, device, steps, path, out / arm) + extra + ["--overwrite"]


def ensemble_lm(out: Path, recipe, device: str) -> dict[str, dict]:
    """Held-out CE and perplexity of the two teachers combined, as the ensemble students' targets: `logits` = softmax
    of the mean logits, `probs` = mean of the two softmaxes (equal weights); the teachers alone for reference."""
    import torch

    from transformers import AutoModelForCausalLM

    from lmdistill.data import load_examples, pad_batch, shift_labels
    from lmdistill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer")
    examples = load_examples(out / "data" / "heldout_text.jsonl", tokenizer, recipe.max_seq_len)
    teachers = [AutoModelForCausalLM.from_pretrained(out / t, dtype=torch.float32).to(device).eval()
                for t in ("teacher_a", "teacher_b")]
    sums, n = {"teacher_a": 0.0, "teacher_b": 0.0, "logits": 0.0, "probs": 0.0}, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = {k: v.to(device) for k, v in pad_batch(examples[start:start + 16], tokenizer.pad_token_id).items()}
            ys = shift_labels(batch["labels"]).reshape(-1)
            rows = ys != -100
            la, lb = (t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                      .flatten(0, 1)[rows] for t in teachers)  # (tokens, vocab) each
            ys = ys[rows]
            logps = {"teacher_a": la.log_softmax(-1), "teacher_b": lb.log_softmax(-1),
                     "logits": ((la + lb) / 2).log_softmax(-1)}
            logps["probs"] = torch.logaddexp(logps["teacher_a"], logps["teacher_b"]) - math.log(2)
            for name, logp in logps.items():
                sums[name] -= logp.gather(-1, ys[:, None]).sum().item()
            n += len(ys)
    return {name: {"ce": s / n, "ppl": math.exp(s / n), "heldout_tokens": n} for name, s in sums.items()}


def evaluate(out: Path, recipe, arms: list[str], device: str) -> dict[str, dict]:
    """The quickstart's evaluation of each arm: held-out LM metrics and exact match on the held-out questions."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmdistill.data import load_examples
    from lmdistill.eval import evaluate_lm, evaluate_task, load_task_records
    from lmdistill.models import count_parameters
    from lmdistill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer")
    examples = load_examples(out / "data" / "heldout_text.jsonl", tokenizer, recipe.max_seq_len)
    records = load_task_records(out / "data" / "heldout_qa.jsonl")
    results = {}
    for arm in arms:
        model = AutoModelForCausalLM.from_pretrained(out / arm, dtype=torch.float32).to(device).eval()
        lm = evaluate_lm(model, examples, tokenizer, batch_size=16, device=device)
        task = evaluate_task(model, tokenizer, records, task="exact_match", max_new_tokens=recipe.max_new_tokens,
                             batch_size=32, device=device, progress=False, num_samples=0)
        results[arm] = {"ce": lm["ce"], "ppl": lm["ppl"], "bits_per_byte": lm["bits_per_byte"],
                        "accuracy": task["accuracy"], "ci95": [task["ci95_low"], task["ci95_high"]],
                        "correct": task["correct"], "questions": task["n"], "heldout_tokens": lm["tokens"],
                        "params": count_parameters(model)[0], "architecture": model.config.model_type}
    return results


def run_training(command: str, argv: list[str]) -> float:
    """One run of `lmdistill COMMAND argv`, parsed exactly as the CLI parses it; returns its seconds."""
    from lmdistill.cli import parse_plan
    from lmdistill.train.loop import Trainer

    start = time.perf_counter()
    trainer = Trainer(parse_plan(command, argv))
    trainer.train()
    if trainer.stop_signal:  # a Ctrl-C stopped the run: stop the benchmark too
        raise KeyboardInterrupt
    return time.perf_counter() - start


def run_seed(seed: int, work_dir: Path, recipe, arms: list[str], device: str) -> dict:
    from lmdistill.quickstart.pipeline import Clock, make_data

    out, clock = work_dir / f"seed{seed}", Clock()
    load_before = os.getloadavg()[0]
    facts = make_data(out, recipe, seed, clock)
    train = {}
    for arm in arms:
        command, steps, argv = run_argv(arm, out, recipe, seed, device)
        clock.say(arm, f"lmdistill {command} ({steps} steps)")
        seconds = run_training(command, argv)
        train[arm] = {"command": f"lmdistill {command} " + " ".join(argv), "steps": steps,
                      "seconds": round(seconds, 1)}
        clock.say(arm, f"trained in {seconds:.1f}s")
    results = evaluate(out, recipe, arms, device)
    for arm in arms:
        results[arm].update(train_steps=train[arm]["steps"], train_seconds=train[arm]["seconds"])
        r = results[arm]
        clock.say("eval", f"{arm}: held-out ppl {r['ppl']:.2f}, exact match {r['correct']}/{r['questions']}")
    ensemble = ensemble_lm(out, recipe, device) if {"teacher_a", "teacher_b"} <= set(arms) else {}
    if ensemble:
        clock.say("eval", "teachers combined, held-out ppl: " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in
                                                                         ensemble.items()))
    return {"seed": seed, "wall_seconds": round(clock(), 1), "load_before": load_before,
            "load_after": os.getloadavg()[0], "data": {k: v for k, v in facts.items() if k != "paths"},
            "train": train, "results": results, "ensemble_teachers": ensemble}


def provenance() -> dict:
    """Which lmdistill ran: its folder, and the commit and uncommitted files of the checkout it sits in."""
    import subprocess

    import lmdistill

    root = Path(lmdistill.__file__).resolve().parents[2]
    def git(*argv: str) -> str | None:
        done = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "src")
    return {"lmdistill": str(Path(lmdistill.__file__).parent), "commit": git("rev-parse", "HEAD"),
            "uncommitted_src": dirty.splitlines() if dirty else []}


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict], arms: list[str]) -> dict:
    out = {arm: {k: stats([r["results"][arm][k] for r in runs]) for k in ("ce", "ppl", "bits_per_byte", "accuracy",
                                                                           "train_seconds")} for arm in arms}
    if runs[0]["ensemble_teachers"]:
        out["ensemble_teachers"] = {k: {m: stats([r["ensemble_teachers"][k][m] for r in runs]) for m in ("ce", "ppl")}
                                    for k in runs[0]["ensemble_teachers"]}
    singles = [a for a in ("kd_a", "kd_b") if a in arms]
    for ens in (a for a in ("ens_logits", "ens_probs") if a in arms):
        for single in singles:  # positive margin = the ensemble student is better
            res = [(r["results"][ens], r["results"][single]) for r in runs]
            out[f"{ens}_vs_{single}"] = {"ppl": stats([s["ppl"] - e["ppl"] for e, s in res]),
                                         "accuracy": stats([e["accuracy"] - s["accuracy"] for e, s in res])}
        out[f"{ens}_beats_both_single_ppl_every_seed"] = all(
            r["results"][ens]["ppl"] < min(r["results"][s]["ppl"] for s in singles) for r in runs)
        out[f"{ens}_beats_both_single_accuracy_every_seed"] = all(
            r["results"][ens]["accuracy"] > max(r["results"][s]["accuracy"] for s in singles) for r in runs)
    out["wall_seconds"] = stats([r["wall_seconds"] for r in runs])
    return out


def table(runs: list[dict], summary: dict, arms: list[str]) -> str:
    seeds = " ".join(f"{'s' + str(r['seed']):>6}" for r in runs)
    lines = [f"{'arm (held-out; mean +- std over seeds)':<54} {'ppl':>14} {'exact match':>15} | ppl per seed {seeds}"
             f" | EM per seed {seeds}"]
    for arm in arms:
        s = summary[arm]
        ppl = " ".join(f"{r['results'][arm]['ppl']:>6.2f}" for r in runs)
        em = " ".join(f"{r['results'][arm]['accuracy']:>6.1%}" for r in runs)
        lines.append(f"{DESCRIPTIONS[arm]:<54} {s['ppl']['mean']:>6.2f} +- {s['ppl']['std']:<4.2f} "
                     f"{s['accuracy']['mean']:>6.1%} +- {s['accuracy']['std']:<5.1%} | {'':>12} {ppl} | {'':>11} {em}")
    for name, s in summary.get("ensemble_teachers", {}).items():
        ppl = " ".join(f"{r['ensemble_teachers'][name]['ppl']:>6.2f}" for r in runs)
        lines.append(f"{'teachers scored by ensemble_lm: ' + name:<54} {s['ppl']['mean']:>6.3f} +- "
                     f"{s['ppl']['std']:<4.3f} {'':>15} | {'':>12} {ppl}")
    for key, value in summary.items():
        if "_vs_" in key:
            lines.append(f"  {key}: ppl {value['ppl']['mean']:+.3f} (min {value['ppl']['min']:+.3f}), exact match "
                         f"{value['accuracy']['mean']:+.1%} (min {value['accuracy']['min']:+.1%})  [+ = ensemble "
                         "better]")
        elif key.endswith("every_seed"):
            lines.append(f"  {key}: {value}")
    w = summary["wall_seconds"]
    lines.append(f"  wall time per seed {w['mean']:.0f} s (min {w['min']:.0f}, max {w['max']:.0f})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps_scale", type=float, default=1.0,
                        help="multiply the quickstart's steps (teachers 900, students 400); 0.05 for a smoke run")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="what to train and evaluate (students need the teachers they learn from)")
    parser.add_argument("--work_dir", default="/tmp/lmdistill_ensemble_seeds",
                        help="runs go to WORK_DIR/seedN/ARM (earlier runs there are overwritten)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "ensemble_seeds.json"))
    args = parser.parse_args()
    import torch

    from lmdistill.quickstart.pipeline import Recipe

    arms = [a for a in ARMS if a in args.arms]
    recipe = Recipe().scaled(args.steps_scale)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, Path(args.work_dir), recipe, arms, args.device))
        print(f"seed {seed}: {runs[-1]['wall_seconds']:.0f}s (load {runs[-1]['load_before']:.1f} -> "
              f"{runs[-1]['load_after']:.1f})", flush=True)
    summary = summarize(runs, arms)
    print(table(runs, summary, arms))
    record = {"command": "python benchmarks/ensemble_seeds.py " + " ".join(sys.argv[1:]),
              "steps": {"teacher": recipe.teacher_steps, "student": recipe.student_steps,
                        "steps_scale": args.steps_scale, "warmup_iters": recipe.warmup_iters},
              "arms": {a: DESCRIPTIONS[a] for a in arms}, "source": provenance(),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "runs": runs, "summary": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
