"""The quickstart's outputs: `results.json`, `loss.png`, `heldout.png`, `report.md`, and the table it prints."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmdistill.quickstart.pipeline import MODELS, Recipe

LABELS = {"teacher": "teacher", "student_ce": "student, CE only", "student_kd": "student, distilled"}
# One colour per model in every plot, whichever models a plot shows (by label, as the plots key them).
COLOURS = {LABELS["teacher"]: "C0", LABELS["student_ce"]: "C1", LABELS["student_kd"]: "C2"}
METRICS = ("ce", "ppl", "bits_per_byte", "kl_to_teacher", "agreement", "accuracy", "ci95", "correct", "questions",
           "params", "train_steps", "train_seconds")

NEXT_STEPS = """\
The same commands run real models; only the paths and sizes change. Teacher and student must share a
tokenizer (e.g. two Qwen3 sizes); models go in and out as Hugging Face folders, nothing is downloaded.

```bash
# baseline: the student fine-tuned with cross-entropy
lmdistill train --model /models/Qwen3-0.6B --data /data/train.jsonl --output_dir runs/ce \\
    --dtype bfloat16 --max_seq_len 1024 --batch_size 4 --accumulation_steps 8 --learning_rate 1e-5 --epochs 1
# the same student distilled from the teacher (forward KL, as here; try --divergence reverse_kl, --top_k 64)
lmdistill distill --teacher /models/Qwen3-4B --student /models/Qwen3-0.6B --data /data/train.jsonl \\
    --output_dir runs/kd --dtype bfloat16 --max_seq_len 1024 --batch_size 4 --accumulation_steps 8 \\
    --learning_rate 1e-5 --epochs 1 --divergence forward_kl --temperature 1.0 --alpha 0.0
# held-out perplexity, bits/byte, KL to the teacher; then task accuracy; then plots of both runs
lmdistill eval --model runs/ce --model runs/kd --teacher /models/Qwen3-4B --data /data/heldout.jsonl
lmdistill eval --model runs/ce --model runs/kd --data /data/heldout_qa.jsonl --task exact_match
lmdistill report runs/ce runs/kd --output_dir runs/compare
```

On several GPUs, launch the same command with `torchrun --nproc_per_node 8 -m lmdistill distill ...` or
`accelerate launch -m lmdistill distill ...` (DDP, FSDP or DeepSpeed through accelerate).

Coming from MiniMind's `train_distillation.py`: the same flag names work with the same meaning
(`--out_dir --epochs --batch_size --learning_rate --data_path --max_seq_len --alpha --temperature
--accumulation_steps --grad_clip --warmup_iters --dtype --device --use_wandb --wandb_project`). Teacher and
student are HF folders; a preset name (`minimind2-small`, `minimind2`, `minimind3`, ...) as `--student` starts
it from scratch with MiniMind's architecture:

```bash
lmdistill distill --teacher /models/minimind2-hf --student /models/minimind2-small-hf \\
    --data_path dataset/sft_mini_512.jsonl --out_dir out/kd --epochs 1 --batch_size 32 \\
    --learning_rate 5e-6 --max_seq_len 512 --alpha 0.0 --temperature 1.0
```
"""


def results_json(results: dict[str, dict], seconds: float) -> dict:
    """`{"teacher": {...}, "student_ce": {...}, "student_kd": {...}, "seconds": N}` (samples stay in the report)."""
    out = {name: {k: results[name][k] for k in METRICS if k in results[name]} for name in MODELS}
    out["seconds"] = round(seconds, 1)
    return out


def plots(out: Path, results: dict[str, dict]) -> dict:
    """`loss.png` (the students' training loss) and `heldout.png` (the three models' held-out metrics, exact
    match in percent with its 95% Wilson interval); returns the figures by file name."""
    from lmdistill.report import read_metrics
    from lmdistill.report.plots import bars_figure, loss_figure, save_figure

    runs = {LABELS[n]: read_metrics(out / n) for n in ("student_ce", "student_kd")}
    figures = {"loss.png": loss_figure(runs, "students' training loss (same data, steps and seed)", COLOURS)}
    metrics = ["ppl", "bits_per_byte", "accuracy"]
    values = {LABELS[n]: {k: results[n][k] for k in metrics} for n in MODELS}
    intervals = {LABELS[n]: {"accuracy": tuple(results[n]["ci95"])} for n in MODELS}
    figures["heldout.png"] = bars_figure(
        values, metrics, "held-out documents (perplexity, bits/byte) and held-out questions (exact match)",
        COLOURS, intervals, percent=["accuracy"])
    for name, fig in figures.items():
        save_figure(fig, out / name)
    return figures


def table(results: dict[str, dict]) -> str:
    """Markdown table of the three models' held-out metrics."""
    rows = ["| model | params | steps | held-out CE | perplexity | bits/byte | KL to teacher | exact match (95% CI) "
            "| train time |", "|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        r = results[name]
        kl = f"{r['kl_to_teacher']:.3f}" if "kl_to_teacher" in r else "-"
        low, high = r["ci95"]
        rows.append(f"| {LABELS[name]} | {r['params'] / 1e6:.2f}M | {r['train_steps']} | {r['ce']:.3f} | "
                    f"{r['ppl']:.2f} | {r['bits_per_byte']:.3f} | {kl} | {r['correct']}/{r['questions']} = "
                    f"{r['accuracy']:.1%} ({low:.0%}-{high:.0%}) | {r['train_seconds']:.0f}s |")
    return "\n".join(rows)


def verdict(results: dict[str, dict]) -> str:
    ce, kd = results["student_ce"], results["student_kd"]
    better_ppl, better_acc = kd["ppl"] < ce["ppl"], kd["accuracy"] > ce["accuracy"]
    if better_ppl and better_acc:
        return (f"The distilled student beat the CE student on both: held-out perplexity {kd['ppl']:.2f} vs "
                f"{ce['ppl']:.2f} and exact match {kd['accuracy']:.1%} vs {ce['accuracy']:.1%}.")
    return (f"This run did not show the usual result (distilled: perplexity {kd['ppl']:.2f}, exact match "
            f"{kd['accuracy']:.1%}; CE: {ce['ppl']:.2f}, {ce['accuracy']:.1%}). Runs shorter than the default "
            "(--steps_scale below 1) are too short for the comparison to mean anything.")


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """`k` of `n` questions drawn at random (fixed by `seed`), in their order: not the first ones, which the
    generator writes person by person."""
    return sorted(random.Random(f"samples-{seed}").sample(range(n), min(k, n)))


def _samples(results: dict[str, dict], seed: int, k: int = 3) -> str:
    """`k` held-out questions drawn with `seed`, each with the three models' answers (every model's samples
    hold the same questions in the same order)."""
    lines = []
    samples = results["teacher"]["samples"]
    for i in sample_indices(len(samples), k, seed):
        sample = samples[i]
        lines.append(f"- **Q{i + 1}:** {sample['prompt']}  **reference:** {sample['reference']}")
        for name in MODELS:
            s = results[name]["samples"][i]
            lines.append(f"  - {LABELS[name]}: {s['prediction']!r} {'✓' if s['correct'] else '✗'}")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, dict], facts: dict, recipe: Recipe, seed: int, seconds: float,
                 command: str) -> Path:
    t, s = results["teacher"], results["student_ce"]
    text = f"""# lmdistill quickstart

`{command}` — seed {seed}, {seconds:.0f} s in all.

## What happened

1. **Data, made by the package** (`lmdistill.quickstart.corpus`): a small world of {facts['people']} people, each
   with a favourite drink, food, game, city and animal. {facts['documents']:,} documents mention these habits
   *noisily* — a sentence like "Ada drinks tea." names the favourite only {_pct()} of the time — so a habit is
   only known by aggregating many mentions. {facts['train_questions']:,} training questions ("What does Ada
   usually drink?" -> "Usually Ada drinks tea.") cover half of the (person, habit) pairs; the other half is
   asked only in the {facts['heldout_questions']} held-out questions, next to {facts['heldout_documents']} held-out
   documents. Files in `data/`.
2. **Tokenizer**: a byte-level BPE trained on the training split ({facts['tokenizer_size']:,} tokens), `tokenizer/`.
3. **Teacher** (`lmdistill train`): the `{recipe.teacher}` preset's width with {recipe.teacher_layers} layers,
   {t['params'] / 1e6:.2f}M parameters, {t['train_steps']} steps on all {facts['teacher_records']:,} training records,
   `teacher/`.
4. **Two students** of {s['params'] / 1e6:.2f}M parameters ({recipe.student}), with the same
   {s['train_steps']} steps, seed and data: the {facts['student_records']:,} records
   ({recipe.student_fraction:.0%}) a student gets. `student_ce/` learns with cross-entropy on the text
   (`lmdistill train`); `student_kd/` matches the teacher's next-token distribution
   (`lmdistill distill --divergence {recipe.divergence} --temperature {recipe.temperature:g} --alpha {recipe.alpha:g}`).
5. **Evaluation**: perplexity and bits/byte on the held-out documents (`evaluate_lm`), greedy answers to the
   held-out questions scored by exact match (`evaluate_task`).

{verdict(results)}

Why: the teacher read five times more text, so its distribution after "Ada drinks" aggregates many more
mentions than the student's 20% holds. Cross-entropy teaches the student the one value each of its
sentences names — and, repeated over many epochs of a small set, to memorise them; distillation teaches it,
at the same positions, the teacher's aggregate.

## Results (held out)

{table(results)}

![students' training loss](loss.png)

The CE student ends with a training loss of {_last(out, 'student_ce', 'loss'):.2f} against a held-out CE of
{results['student_ce']['ce']:.2f}: it memorises its 20%. The distilled student's loss is its KL to the teacher; its
CE on the same training text (dashed) ends at {_last(out, 'student_kd', 'ce_loss'):.2f}, close to its held-out
{results['student_kd']['ce']:.2f}.

![held-out metrics](heldout.png)

Exact match is in percent, with its 95% Wilson interval as error bars: on {results['teacher']['questions']} questions,
differences inside the bars can be noise. Each model keeps its colour in both plots.

Three of the {results['teacher']['questions']} held-out questions, drawn at random (seed {seed}):

{_samples(results, seed)}

`results.json` holds these numbers; each run folder holds its model (a Hugging Face folder), `metrics.jsonl`
and the options it ran with (`lmdistill_config.yaml`).

## Next: real models

{NEXT_STEPS}"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def _last(out: Path, run: str, key: str) -> float:
    """The last logged value of a train metric of a run."""
    from lmdistill.report import read_metrics

    values = [r[key] for r in read_metrics(out / run)["train"] if r.get(key) is not None]
    return values[-1] if values else float("nan")


def _pct() -> str:
    from lmdistill.quickstart.corpus import FAVOURITE_P

    return f"{FAVOURITE_P:.0%}"


def save(out: Path, results: dict[str, dict]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def console_table(results: dict[str, dict]) -> str:
    header = f"{'model':<20} {'CE':>7} {'ppl':>8} {'bits/byte':>10} {'KL':>7} {'exact match':>12}"
    lines = [header, "-" * len(header)]
    for name in MODELS:
        r = results[name]
        kl = f"{r['kl_to_teacher']:.3f}" if "kl_to_teacher" in r else "-"
        lines.append(f"{LABELS[name]:<20} {r['ce']:>7.3f} {r['ppl']:>8.2f} {r['bits_per_byte']:>10.3f} {kl:>7} "
                     f"{r['accuracy']:>11.1%}")
    return "\n".join(lines)
