"""`lmdistill quickstart`: the whole distillation path on a laptop CPU in about 3.5 minutes, no network, no files.

    lmdistill quickstart                                  # -> lmdistill_quickstart/report.md
    lmdistill quickstart --seed 1 --output_dir qs1
    lmdistill quickstart --steps_scale 0.05               # a seconds-long smoke run (numbers mean nothing)

1. Generates its data (`corpus.py`): text about a small world whose facts only show as tendencies over many
   noisy mentions, questions with checkable answers about it, and a held-out split made apart.
2. Trains a byte-level BPE tokenizer and a teacher (`micro`'s width with 2 layers: 256 x 2) on all the training
   data.
3. Trains two students (`nano`, 128 x 2) with the same steps, seed and data: the 20% a student gets. One
   learns with cross-entropy, the other matches the teacher's distribution (forward KL) -- the common real
   case where a teacher has seen more data than the student is trained on.
4. Evaluates the three models: perplexity and bits/byte on held-out documents, exact match on held-out
   questions; writes `results.json`, `loss.png`, `heldout.png` and `report.md`, prints what to run next.

Everything goes through the toolkit's own pieces (`train_tokenizer`, the `Trainer` of `lmdistill train` and
`lmdistill distill`, `evaluate_lm`, `evaluate_task`, `lmdistill.report`), so the quickstart is also their
end-to-end test.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

OUTPUTS = ("data", "tokenizer", "teacher", "student_ce", "student_kd", "report.md", "loss.png", "heldout.png",
           "results.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="lmdistill_quickstart", help="where everything is written")
    parser.add_argument("--seed", type=int, default=0, help="seeds the generated world, the data and the models")
    from lmdistill.config import float_in

    parser.add_argument("--steps_scale", type=float_in(0, lo_open=True), default=1.0,
                        help="multiply every step count (e.g. 2 for a longer run, 0.05 for a smoke test)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lmdistill.models.loading import check_device
    from lmdistill.quickstart import pipeline, summary

    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    recipe = pipeline.Recipe().scaled(args.steps_scale)
    clock = pipeline.Clock()
    _clear_previous_run(out)
    clock.say("quickstart", f"seed {args.seed}, device {device}, output {out}")
    facts = pipeline.make_data(out, recipe, args.seed, clock)
    info = pipeline.train_models(out, recipe, args.seed, device, clock)
    results = pipeline.evaluate_models(out, recipe, device, clock)
    for name in results:
        results[name].update(info[name])
    summary.plots(out, results)
    seconds = clock()
    summary.save(out, summary.results_json(results, seconds))
    command = "lmdistill quickstart " + " ".join(
        f"--{k} {v}" for k, v in (("seed", args.seed), ("steps_scale", args.steps_scale), ("output_dir", out)))
    report = summary.write_report(out, results, facts, recipe, args.seed, seconds, command)
    print()
    print(summary.console_table(results))
    print(f"\n{summary.verdict(results)}")
    print(f"Finished in {seconds:.0f}s. Report: {report}  (results.json, loss.png, heldout.png next to it)")
    print("\nNext, with real models (see the report for the full list):\n"
          "  lmdistill distill --teacher /models/Qwen3-4B --student /models/Qwen3-0.6B --data /data/train.jsonl "
          "--output_dir runs/kd --dtype bfloat16\n"
          "  lmdistill eval --model runs/kd --teacher /models/Qwen3-4B --data /data/heldout.jsonl")
    return 0


def _clear_previous_run(out: Path) -> None:
    """Remove what an earlier quickstart wrote here (runs append to metrics.jsonl); nothing else is touched."""
    found = [out / name for name in OUTPUTS if (out / name).exists()]
    if found:
        print(f"replacing the previous quickstart run in {out}")
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
