"""What an offline teacher cache buys per distillation step: lmdistill's Trainer with an online teacher vs the same
run reading `lmdistill cache-teacher` output (top-k rows), same student, data, order and options.

    python benchmarks/cached_step.py                  # minimind2 -> minimind2-small, ~3 min -> results/cached_step_cpu.json
    python benchmarks/cached_step.py --pair micro->nano
    python benchmarks/cached_step.py --device cuda    # bf16, CUDA events, GPU memory -> results/cached_step_cuda.json

The cache is built once (its time is reported: it is one teacher forward per token, paid once for every later
run); then each variant runs `--steps` optimizer steps in its own process and the median step time after one
warmup step is kept. Both variants use top-k 64 so the loss is the same function (the online run truncates
its teacher to the same k); forward KL at T=1, batch 8, fp32 on CPU, bf16 (lmdistill's `--dtype bfloat16`) by
default on CUDA. Data: the first `--examples` packed blocks of tinyshakespeare with the MiniMind tokenizer (the
benchmark skips when ../shared/data is absent). Step time: wall clock on CPU, CUDA events on a GPU; peak memory: the
RSS high-water mark on CPU, torch.cuda.max_memory_allocated on a GPU, reset once the trainer is built.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from device import DATA_DIR, Clock, Memory, add_device_options, machine_record, resolve, results_path

DATA = DATA_DIR / "tinyshakespeare.txt"
TOKENIZER = DATA_DIR / "minimind_tokenizer"
PAIRS = {"minimind2->minimind2-small": ("minimind2", "minimind2-small", 128),
         "micro->nano": ("micro", "nano", 256)}
TOP_K, BATCH = 64, 8


def options(student: str, seq_len: int, data: Path, out: Path, teacher: dict, steps: int, device: str,
            dtype: str) -> dict:
    """`DistillConfig` fields of one run; `teacher` is {"teacher": [DIR]} or {"teacher_cache": [DIR]}."""
    return {**teacher, "student": student, "data": str(data), "output_dir": str(out), "max_steps": steps,
            "batch_size": BATCH, "max_seq_len": seq_len, "top_k": TOP_K, "alpha": 0.0, "temperature": 1.0,
            "dtype": dtype, "device": device, "seed": 0, "learning_rate": 1e-4}


def worker(args_json: str) -> dict:
    from lmdistill import DistillConfig
    from lmdistill.api import plan
    from lmdistill.train.loop import Trainer

    cfg = json.loads(args_json)
    device = cfg["options"]["device"]
    trainer = Trainer(plan(DistillConfig(**cfg["options"])))
    clock, memory = Clock(device), Memory(device)
    base, _ = memory.reset()
    times, tokens = [], []
    for step in range(cfg["steps"]):
        clock.start()
        stats = trainer.step()
        times.append(clock.stop())
        tokens.append(stats["tokens"])
    peak = memory.peak()
    return {"step_seconds": times, "median_step_seconds": statistics.median(times[1:]),
            "tokens_per_sec": statistics.median(t / s for t, s in zip(tokens[1:], times[1:])),
            "first_step_kd_loss": None, "peak_mb": peak, "above_baseline_mb": peak - base}


def run_worker(options_: dict, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps({"options": options_, "steps": steps})]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker")
    p.add_argument("--pair", default="minimind2->minimind2-small", choices=list(PAIRS))
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--steps", type=int, default=6)
    add_device_options(p)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = resolve(p, a.device, a.dtype)
    if a.worker:
        print(json.dumps(worker(a.worker)))
        return
    if not DATA.is_file() or not TOKENIZER.is_dir():
        print(f"skipped: {DATA} or {TOKENIZER} not present")
        return
    from lmdistill import CacheTeacherConfig
    from lmdistill.api import cache_teacher
    from lmdistill.data import load_examples
    from lmdistill.models import load_model
    from lmdistill.tokenizer import load_tokenizer

    teacher_preset, student, seq_len = PAIRS[a.pair]
    tok = load_tokenizer(str(TOKENIZER))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blocks = list(load_examples(str(DATA), tok, seq_len))[: a.examples]
        data = tmp / "blocks.jsonl"  # the first blocks as plain-text records that re-tokenize to the same blocks
        data.write_text("".join(json.dumps({"text": tok.decode(b["input_ids"])}) + "\n" for b in blocks))
        n_ex = len(load_examples(str(data), tok, seq_len))
        torch.manual_seed(0)
        teacher_dir = tmp / "teacher"
        load_model(teacher_preset, tokenizer=tok, dtype="float32", verbose=False).save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        t0 = time.perf_counter()
        cache_teacher(CacheTeacherConfig(teacher=str(teacher_dir), data=str(data), output_dir=str(tmp / "cache"),
                                         max_seq_len=seq_len, top_k=TOP_K, device=a.device))
        cache_seconds = time.perf_counter() - t0
        cache_mb = sum(f.stat().st_size for f in (tmp / "cache").iterdir() if f.is_file()) / 2**20
        runs = {}
        for name, teacher in (("online teacher", {"teacher": [str(teacher_dir)]}),
                              ("teacher cache", {"teacher_cache": [str(tmp / "cache")]})):
            run_options = options(student, seq_len, data, tmp / name.replace(" ", "_"), teacher, a.steps, a.device,
                                  dtype)
            runs[name] = run_worker(run_options, a.steps)
            r = runs[name]
            print(f"  {name:15s} {r['tokens_per_sec']:8.0f} tok/s  step {r['median_step_seconds']:.3f} s  "
                  f"peak {r['peak_mb']:.0f} MiB", flush=True)
    on, ca = runs["online teacher"], runs["teacher cache"]
    summary = {"pair": a.pair, "examples": n_ex, "top_k": TOP_K, "cache_build_seconds": cache_seconds,
               "cache_mb": cache_mb, "speedup_tokens_per_sec": ca["tokens_per_sec"] / on["tokens_per_sec"],
               "peak_ratio": ca["peak_mb"] / on["peak_mb"]}
    print(f"\n| {a.pair} | tokens/s | step s | peak MiB |\n|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['tokens_per_sec']:.0f} | {r['median_step_seconds']:.3f} | {r['peak_mb']:.0f} |")
    print(f"\ncache: {n_ex} examples built in {cache_seconds:.1f} s ({cache_mb:.1f} MiB); cached step "
          f"{summary['speedup_tokens_per_sec']:.2f}x the online tokens/s at {summary['peak_ratio']:.2f}x its peak")
    out = results_path("cached_step", a.device, out=a.out)
    machine = {**machine_record(a.device, dtype), "threads": torch.get_num_threads(),
               "load_average": list(os.getloadavg())}
    out.write_text(json.dumps({"machine": machine, "runs": runs, "summary": summary}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
