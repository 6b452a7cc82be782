"""`--dry_run`'s memory estimate against the peaks `benchmarks/distill_step.py` measured, pair by pair.

    python benchmarks/estimate_check.py        # reads results/distill_step_cpu.json -> results/estimate_check_cpu.json
    python benchmarks/estimate_check.py --results benchmarks/results/distill_step_cuda.json

No step is run: for each lmdistill run the JSON holds, the pair's models are built on the meta device from their
description ("micro hidden_size=512 num_layers=4": a preset and its size knobs; the recorded vocabulary), the data is
tokenized as the benchmark tokenizes it, and `lmdistill.train.memory.estimate` gives the estimate for the recorded
batch, sequence length, dtype and device (one process). A run this script cannot configure is skipped, saying why.

Like is compared with like. The benchmark records two peaks:
- absolute (`peak_mb`): the process's RSS high-water mark (CPU) or torch.cuda's max allocated memory (GPU). The
  estimate's total: on CPU it includes the process baseline (imports) and the tokenized data; it does not include
  what the benchmark itself holds (its 2048^2 matmul buffers, 48 MiB) nor memory the allocator kept after
  tokenizing, so it reads low there by about that much.
- above baseline (`above_baseline_mb`): the peak minus the RSS (or allocated memory) when the high-water mark was
  reset, once models, data and trainer were built. On CPU, weights loaded from a saved folder (the teacher, and a
  student built with its own sizes or vocabulary) are memory-mapped safetensors that become resident during the
  first step, so they count above that baseline; a preset student's weights were resident before. The comparable
  estimate is the total minus the process baseline, the data and the weights resident at the reset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MINIMIND_TOKENIZER = Path("/work/shared/data/minimind_tokenizer")
DATA = Path("/work/shared/data/tinyshakespeare.txt")
RESULTS = Path(__file__).parent / "results"
TARGET = 0.25  # |estimate / measured - 1| on the step's memory (above baseline)


class Skip(Exception):
    """A run this script cannot configure (the reason is printed)."""


def _model(description: str, vocab: int, tokenizer):
    """'micro hidden_size=512 num_layers=4' -> a meta model of the preset with those knobs and `vocab` rows."""
    from lmdistill.models import PRESETS, load_model

    preset, *knobs = description.split()
    if preset not in PRESETS:
        raise Skip(f"'{preset}' is not a preset")
    try:
        overrides = {k: int(v) for k, v in (knob.split("=") for knob in knobs)}
    except ValueError:
        raise Skip(f"cannot read the knobs of '{description}' (expected name=integer)") from None
    return load_model(preset, tokenizer=tokenizer, vocab_size=vocab, device="meta", verbose=False, **overrides)


def check_run(run: dict, tokenizer, examples_by_len: dict) -> dict:
    """The estimate for one recorded lmdistill run, next to its measured peaks (MiB)."""
    from lmdistill.data import load_examples
    from lmdistill.models.shapes import TeacherShape, model_shape
    from lmdistill.train.estimate import data_bytes
    from lmdistill.train.memory import MiB, RunShape, estimate

    if tokenizer is None:
        raise Skip("the results were made with a tokenizer this script does not rebuild")
    vocab = int(run.get("vocab_size") or len(tokenizer))
    device, dtype = run.get("device", "cpu"), run.get("dtype", "float32")
    student = model_shape(_model(run["student"], vocab, tokenizer), run["student"])
    teacher_model = model_shape(_model(run["teacher"], vocab, tokenizer), run["teacher"])
    teacher = TeacherShape(run["teacher"], teacher_model, "float32" if dtype == "float32" else dtype)
    seq_len, batch = int(run["seq_len"]), int(run["batch"])
    if seq_len not in examples_by_len:
        examples_by_len[seq_len] = load_examples(str(DATA), tokenizer, seq_len)
    examples = examples_by_len[seq_len]
    shape = RunShape("distill", batch, seq_len, dtype=dtype, device="cuda" if device.startswith("cuda") else "cpu",
                     max_steps=int(run["steps"]))
    est = estimate(shape, student, [teacher], len(examples), data_bytes(examples))
    total = est.total(False)
    own_student = len(run["student"].split()) > 1 or vocab != len(tokenizer)  # loaded from a saved folder
    resident = (sum(est.host.values()) + (0 if own_student else est.weights)) if shape.device == "cpu" else (
        student.params * 4 + teacher_model.params * (4 if dtype == "float32" else 2))  # not autocast's copies
    step = total - resident
    measured, above = float(run["peak_mb"]), float(run["above_baseline_mb"])
    return {"pair": run["pair"], "device": device, "dtype": dtype, "batch": batch, "seq_len": seq_len,
            "vocab_size": vocab, "estimated_mb": total / MiB, "measured_mb": measured,
            "error": total / MiB / measured - 1, "estimated_above_baseline_mb": step / MiB,
            "measured_above_baseline_mb": above, "error_above_baseline": step / MiB / above - 1,
            "parts_mb": {k: v / MiB for k, v in (
                ("weights", est.weights), ("gradients", est.gradients), ("optimizer", est.optimizer),
                ("activations", est.activations), ("teacher", est.teacher), ("loss", est.loss),
                *(est.host.items() if shape.device == "cpu" else ()))},
            "student_loaded_from_folder": own_student, "loss_chunk": est.chunk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS / "distill_step_cpu.json"), help="distill_step.py's JSON")
    p.add_argument("--out", default=None, help="default: results/estimate_check_{cpu,cuda}.json")
    a = p.parse_args()
    from lmdistill.tokenizer import load_tokenizer

    record = json.loads(Path(a.results).read_text())
    minimind = record.get("tokenizer") == "minimind"
    tokenizer = load_tokenizer(str(MINIMIND_TOKENIZER), "--tokenizer") if minimind else None
    rows, skipped, examples = [], [], {}
    for run in record["runs"]:
        if run["impl"] != "lmdistill":
            continue
        try:
            rows.append(check_run(run, tokenizer, examples))
        except (Skip, KeyError) as exc:
            skipped.append({"pair": run.get("pair"), "reason": str(exc)})
            print(f"skipped {run.get('pair')}: {exc}")
    print("\n| pair | device, dtype | estimated MiB | measured MiB | error | estimated above baseline MiB | "
          "measured above baseline MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} (batch {r['batch']} x {r['seq_len']}, vocab {r['vocab_size']:,}) | {r['device']}, "
              f"{r['dtype']} | {r['estimated_mb']:,.0f} | {r['measured_mb']:,.0f} | {r['error']:+.0%} | "
              f"{r['estimated_above_baseline_mb']:,.0f} | {r['measured_above_baseline_mb']:,.0f} | "
              f"{r['error_above_baseline']:+.0%} |")
    worst = max((abs(r["error_above_baseline"]) for r in rows), default=None)
    if worst is not None:
        print(f"\nworst error above baseline: {worst:.0%} (target within {TARGET:.0%}: "
              f"{'met' if worst <= TARGET else 'NOT met'})")
    device = "cuda" if any(r["device"].startswith("cuda") for r in rows) else "cpu"
    out = Path(a.out or RESULTS / f"estimate_check_{device}.json")
    out.write_text(json.dumps({"source": str(a.results), "source_machine": record.get("machine"), "rows": rows,
                               "skipped": skipped, "target": TARGET, "worst_error_above_baseline": worst,
                               "method": __doc__.split("\n\n", 2)[2].strip()}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
