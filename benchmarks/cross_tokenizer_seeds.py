"""Does cross-tokenizer distillation help? The quickstart's world and teacher (its own tokenizer A), and a student
with another tokenizer B, three seeds, equal steps and data.

    python benchmarks/cross_tokenizer_seeds.py          # seeds 0 1 2 -> results/cross_tokenizer_seeds.json
    python benchmarks/cross_tokenizer_seeds.py --seeds 0 --steps_scale 0.05 --output /tmp/smoke.json

Per seed: `pipeline.make_data` (world, splits, tokenizer A), the quickstart's teacher (micro's width, 2 layers, on
all the training data, tokenizer A), tokenizer B (byte-level BPE trained on the same training texts with
--vocab_b tokens, default 400: a different segmentation of the same text), then three `nano` students with
tokenizer B, each S = 400 steps on the students' 20% with the quickstart's batch, learning rate, warmup and seed,
through the same cross-tokenizer data path (one example per document, aligned to the teacher's tokens):

    ce         --cross_tokenizer uld --alpha 1: cross-entropy only (the teacher's term has weight 0): the baseline
    uld        --cross_tokenizer uld --alpha 0.5: CE + ULD, as the ULD paper trains
    gold       --cross_tokenizer gold --alpha 0.5: CE + GOLD
    gold_only  --cross_tokenizer gold --alpha 0: GOLD alone

Evaluation with each model's own tokenizer: bits per byte on the held-out documents (comparable across
tokenizers), perplexity per token (not comparable between A and B), exact match on the held-out questions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from seeds import new_record, run_seeds, seed_parser, stats  # benchmarks/seeds.py

ARMS = {"ce": dict(cross_tokenizer="uld", alpha=1.0), "uld": dict(cross_tokenizer="uld", alpha=0.5),
        "gold": dict(cross_tokenizer="gold", alpha=0.5), "gold_only": dict(cross_tokenizer="gold", alpha=0.0)}


def evaluate(folder: Path, data: Path, recipe, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lmdistill.data import load_examples
    from lmdistill.eval import evaluate_lm, evaluate_task, load_task_records
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    lm = evaluate_lm(model, load_examples(data / "heldout_text.jsonl", tok, recipe.max_seq_len), tok, None,
                     batch_size=16, device=device)
    task = evaluate_task(model, tok, load_task_records(data / "heldout_qa.jsonl"), task="exact_match",
                         max_new_tokens=recipe.max_new_tokens, batch_size=32, device=device, progress=False)
    return {"bits_per_byte": lm["bits_per_byte"], "ppl": lm["ppl"], "ce": lm["ce"], "accuracy": task["accuracy"],
            "ci95": [task["ci95_low"], task["ci95_high"]], "correct": task["correct"], "questions": task["n"],
            "tokenizer_size": len(tok)}


def run_seed(seed: int, recipe, work_dir: Path, device: str, vocab_b: int) -> dict:
    from lmdistill.api import DistillConfig, TrainConfig
    from lmdistill.quickstart import pipeline
    from lmdistill.tokenizer import train_tokenizer

    out = work_dir / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    clock = pipeline.Clock()
    load_before = os.getloadavg()[0]
    facts = pipeline.make_data(out, recipe, seed, clock)
    data = out / "data"
    options = lambda steps, path, name: pipeline.common_options(recipe, seed, device, steps, path, out / name)  # noqa
    seconds = {"teacher": pipeline.run_training(TrainConfig(
        **options(recipe.teacher_steps, data / "teacher_train.jsonl", "teacher"), model=recipe.teacher,
        num_layers=recipe.teacher_layers, tokenizer=str(out / "tokenizer")))}
    texts = [json.loads(line)["text"] for line in (data / "teacher_train.jsonl").read_text().splitlines()]
    tok_b = train_tokenizer(texts=texts, vocab_size=vocab_b, output_dir=out / "tokenizer_b")
    clock.say("tokenizer B", f"{len(tok_b)} tokens (A has {facts['tokenizer_size']})")
    for arm, extra in ARMS.items():
        start = time.perf_counter()
        from lmdistill.api import distill

        distill(DistillConfig(**options(recipe.student_steps, data / "student_train.jsonl", f"student_{arm}"),
                              teacher=[str(out / "teacher")], student=recipe.student, tokenizer=str(out / "tokenizer_b"),
                              **extra))
        seconds[arm] = time.perf_counter() - start
        clock.say(arm, f"trained in {seconds[arm]:.1f}s")
    models = {}
    for name in ("teacher", *ARMS):
        folder = out / (name if name == "teacher" else f"student_{name}")
        models[name] = {**evaluate(folder, data, recipe, device), "seconds": round(seconds[name], 1)}
        if name != "teacher":
            rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in rows if r["type"] == "train"]
            models[name]["aligned_share"] = sum(r["aligned_tokens"] for r in train) / max(
                sum(r["trained_tokens"] for r in train), 1)
        clock.say("eval", f"{name}: bits/byte {models[name]['bits_per_byte']:.4f}, exact match "
                  f"{models[name]['correct']}/{models[name]['questions']}")
    return {"seed": seed, "seconds": round(clock(), 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "facts": {k: v for k, v in facts.items() if k != "paths"}, "tokenizer_b_size": len(tok_b),
            "models": models}


def summarize(runs: list[dict]) -> dict:
    out = {m: {k: stats([r["models"][m][k] for r in runs]) for k in ("bits_per_byte", "accuracy", "seconds")}
           for m in ("teacher", *ARMS)}
    for arm in ("uld", "gold", "gold_only"):
        out[f"{arm}_minus_ce"] = {k: stats([r["models"][arm][k] - r["models"]["ce"][k] for r in runs])
                                  for k in ("bits_per_byte", "accuracy")}
    return out


def main() -> int:
    parser = seed_parser(__doc__, "cross_tokenizer_seeds")
    parser.add_argument("--vocab_b", type=int, default=400, help="the student's tokenizer size")
    args = parser.parse_args()

    from lmdistill.quickstart.pipeline import Recipe

    recipe = Recipe().scaled(args.steps_scale)
    record = new_record("cross_tokenizer_seeds.py", f"--seeds {' '.join(map(str, args.seeds))} --steps_scale "
                        f"{args.steps_scale:g} --vocab_b {args.vocab_b} --device {args.device}", recipe)
    record["arms"] = ARMS
    run_seeds(record, args.seeds, lambda seed: run_seed(seed, recipe, Path(args.work_dir), args.device, args.vocab_b),
              summarize, Path(args.output))
    s = record["summary"]
    for m in ("teacher", *ARMS):
        print(f"{m:<8} bits/byte {s[m]['bits_per_byte']['mean']:.4f} +- {s[m]['bits_per_byte']['std']:.4f}  exact match "
              f"{s[m]['accuracy']['mean']:.1%} +- {s[m]['accuracy']['std']:.1%}  {s[m]['seconds']['mean']:.0f}s")
    for arm in ("uld", "gold", "gold_only"):
        d = s[f"{arm}_minus_ce"]
        print(f"{arm} - ce: bits/byte {d['bits_per_byte']['mean']:+.4f} ({d['bits_per_byte']['min']:+.4f}.."
              f"{d['bits_per_byte']['max']:+.4f}), exact match {d['accuracy']['mean']:+.1%}")
    print(f"wrote {args.output} ({record['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
