"""One on-policy distillation step: lmdistill's Trainer vs TRL's `DistillationTrainer`, on CPU or a GPU.

    python benchmarks/on_policy_step.py      # 8 steps x 4 processes each, ~1 min -> results/on_policy_step_cpu.json
    python benchmarks/on_policy_step.py --steps 3 --rounds 1 --out /tmp/ops.json     # smoke run
    python benchmarks/on_policy_step.py --device cuda    # bf16, CUDA events -> results/on_policy_step_cuda.json

One step = the student samples a completion (up to 64 new tokens, temperature 1, KV cache) for each of 8 prompts,
the teacher scores prompt + completion, reverse KL (teacher || student in the student's samples: KL(p_s || p_t))
on the completion tokens, backward, grad clip 1.0, AdamW. fp32 on CPU; on CUDA `--dtype bfloat16` (its default
there): bf16 autocast over fp32 student weights and a bf16 teacher in both. The same models (teacher: `micro` built
with seed 0 and saved with the tokenizer; student: `nano` built after `set_seed(0)`), the same tokenizer
(/work/shared/data/minimind_tokenizer, 6,400 tokens), the same 8 x steps prompts (alpaca_en_demo, the user turn,
in a fixed order; each implementation batches them in its own order).
  lmdistill  `lmdistill.train.loop.Trainer.step()` from `DistillConfig(on_policy_fraction=1,
             divergence="reverse_kl", max_new_tokens=64)`: the whole step (generation included)
  trl        `trl.DistillationTrainer` (TRL 1.16: always on-policy; beta=1 is reverse KL), temperature 1,
             max_completion_length 64, bf16 (True under --dtype bfloat16), gradient_checkpointing=False,
             optim adamw_torch; the step is on_step_begin -> on_step_end (generation happens inside it, in
             `_prepare_inputs`)
Each implementation runs in its own process, one at a time, in alternating order over `--rounds` (ABBA...).
Completion tokens/s = completion tokens trained in the step (the reply and the stop token when one was sampled:
lmdistill's `trained_tokens`, TRL's `completion_mask` sum) / step seconds, median over the steps after the
first. The untrained student rarely samples a stop token, so nearly every reply runs to 64 tokens in both.
Step time: wall clock on CPU, CUDA events on a GPU. Peak memory: on CPU the RSS high-water mark, on CUDA
torch.cuda.max_memory_allocated, reset once models and trainer are built (`device.py`), read after the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from device import DATA_DIR, Clock, Memory, add_device_options, is_cuda, machine_record, resolve, results_path

PROMPTS = DATA_DIR / "alpaca_en_demo.json"
SEED, BATCH, LR, WEIGHT_DECAY, CLIP, MAX_NEW = 0, 8, 1e-4, 0.01, 1.0, 64
IMPLS = ("lmdistill", "trl")


class Meter:
    def __init__(self, device: str):
        self.rows, self.clock, self.memory = [], Clock(device), Memory(device)

    def ready(self):
        self.base, self.reset = self.memory.reset()

    def begin(self):
        self.clock.start()

    def end(self, completion_tokens: int):
        self.rows.append((self.clock.stop(), completion_tokens))


def run_lmdistill(teacher_dir: str, prompts_file: str, steps: int, tmp: str, meter: Meter, device: str,
                  dtype: str) -> None:
    from lmdistill import DistillConfig
    from lmdistill.api import plan
    from lmdistill.train.loop import Trainer

    trainer = Trainer(plan(DistillConfig(
        teacher=[teacher_dir], student="nano", data=prompts_file, output_dir=str(Path(tmp) / "lmdistill"),
        max_steps=steps, batch_size=BATCH, learning_rate=LR, weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
        max_seq_len=1024, divergence="reverse_kl", temperature=1.0, alpha=0.0, on_policy_fraction=1.0,
        max_new_tokens=MAX_NEW, generation_temperature=1.0, dtype=dtype, device=device, seed=SEED)))
    trainer.model.train()
    meter.ready()
    for _ in range(steps):
        meter.begin()
        stats = trainer.step()
        meter.end(stats["trained_tokens"])


def run_trl(teacher_dir: str, prompts_file: str, steps: int, tmp: str, meter: Meter, device: str, dtype: str) -> None:
    from accelerate.utils import set_seed
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from lmdistill.models import load_model, load_teacher
    from lmdistill.tokenizer import load_tokenizer

    set_seed(SEED)
    tok = load_tokenizer(teacher_dir, "--teacher")
    tok.padding_side = "left"
    where = device if is_cuda(device) else None  # on CPU loaded exactly as before (no device_map)
    teacher = load_teacher(teacher_dir, dtype=dtype, tokenizer=tok, device=where, verbose=False)  # as lmdistill's
    student = load_model("nano", tokenizer=tok, dtype="float32", device=where, verbose=False)
    rows = [{"prompt": json.loads(line)["conversations"]} for line in Path(prompts_file).read_text().splitlines()]
    counts = []

    class Timer(TrainerCallback):  # generation runs inside the step (_prepare_inputs), so it is timed
        def on_step_begin(self, args, state, control, **kw):
            meter.begin()

        def on_step_end(self, args, state, control, **kw):
            meter.end(counts[-1])

    config = DistillationConfig(
        output_dir=str(Path(tmp) / "trl"), beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=MAX_NEW, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, lr_scheduler_type="constant", use_cpu=not is_cuda(device),
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=SEED,
        bf16=dtype == "bfloat16", gradient_checkpointing=False,
        optim="adamw_torch", shuffle_dataset=False, dataloader_num_workers=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
    generate = trainer._generate_and_score_completions

    def counted(inputs):
        out = generate(inputs)
        counts.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = counted
    meter.ready()
    trainer.train()


def worker(impl: str, teacher_dir: str, prompts_file: str, steps: int, device: str, dtype: str) -> dict:
    import torch

    meter = Meter(device)
    with tempfile.TemporaryDirectory() as tmp:
        (run_lmdistill if impl == "lmdistill" else run_trl)(teacher_dir, prompts_file, steps, tmp, meter, device, dtype)
        peak = meter.memory.peak()
    times, tokens = [r[0] for r in meter.rows], [r[1] for r in meter.rows]
    measured = range(1, len(times))
    return {"impl": impl, "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
            "step_seconds": times, "completion_tokens": tokens,
            "median_step_seconds": statistics.median(times[i] for i in measured),
            "completion_tokens_per_sec": statistics.median(tokens[i] / times[i] for i in measured),
            "baseline_mb": meter.base, "peak_mb": peak, "above_baseline_mb": peak - meter.base,
            "peak_reset": meter.reset}


def write_prompts(path: Path, n: int) -> None:
    from lmdistill.data import load_prompts

    prompts = load_prompts(PROMPTS)[:n]
    path.write_text("".join(json.dumps({"conversations": p}, ensure_ascii=False) + "\n" for p in prompts))


def run_worker(impl: str, teacher_dir: Path, prompts: Path, steps: int, threads: int, device: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--teacher_dir", str(teacher_dir), "--prompts", str(prompts),
           "--steps", str(steps), "--device", device, "--dtype", dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("@@result ")]
    if done.returncode or not lines:
        return {"impl": impl, "error": f"exit status {done.returncode}", "stderr_tail": done.stderr[-4000:]}
    return json.loads(lines[-1][len("@@result "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=IMPLS)
    p.add_argument("--teacher_dir")
    p.add_argument("--prompts")
    p.add_argument("--steps", type=int, default=8, help="steps per process, the first left out of the median")
    p.add_argument("--rounds", type=int, default=4, help="processes per implementation, in alternating order")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    add_device_options(p)
    p.add_argument("--out", default=None, help="default: results/on_policy_step_<cpu|cuda>.json")
    a = p.parse_args()
    dtype = resolve(p, a.device, a.dtype)
    if a.worker:
        result = worker(a.worker, a.teacher_dir, a.prompts, a.steps, a.device, dtype)
        print("@@result " + json.dumps(result), flush=True)
        return 0
    out = results_path("on_policy_step", a.device, out=a.out)
    sys.path.insert(0, str(Path(__file__).parent))
    from distill_step import MINIMIND_TOKENIZER, get_tokenizer, prepare_teacher

    if not PROMPTS.is_file() or not MINIMIND_TOKENIZER.is_dir():
        print(f"skipped: needs {PROMPTS} and {MINIMIND_TOKENIZER}; not found.")
        return 0

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, prompts = Path(tmp) / "teacher", Path(tmp) / "prompts.jsonl"
        tokenizer = get_tokenizer("minimind")
        prepare_teacher("micro", tokenizer, teacher_dir)
        write_prompts(prompts, BATCH * a.steps)
        for r in range(a.rounds):
            for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
                runs.append({"round": r, **run_worker(impl, teacher_dir, prompts, a.steps, a.threads, a.device, dtype)})
                x = runs[-1]
                print(f"round {r} {impl:9s} " + (f"{x['completion_tokens_per_sec']:7.1f} completion tok/s, step "
                      f"{x['median_step_seconds']:.3f}s, peak {x['peak_mb']:.0f} MiB" if "error" not in x
                      else f"failed: {x['error']}\n{x['stderr_tail'][-1500:]}"), flush=True)
    summary = {}
    for impl in IMPLS:
        ok = [x for x in runs if x["impl"] == impl and "error" not in x]
        if ok:
            summary[impl] = {k: statistics.median(x[k] for x in ok) for k in
                             ("completion_tokens_per_sec", "median_step_seconds", "peak_mb", "above_baseline_mb")}
    print(f"{'impl':<10} {'compl. tok/s':>12} {'step s':>8} {'peak MiB':>13} {'above base':>11}")
    for impl, s in summary.items():
        print(f"{impl:<10} {s['completion_tokens_per_sec']:>12.1f} {s['median_step_seconds']:>8.3f} "
              f"{s['peak_mb']:>13.0f} {s['above_baseline_mb']:>11.0f}")
    if len(summary) == 2:
        summary["speed_ratio_lmdistill_over_trl"] = (summary["lmdistill"]["completion_tokens_per_sec"]
                                                     / summary["trl"]["completion_tokens_per_sec"])
        summary["peak_ratio_lmdistill_over_trl"] = summary["lmdistill"]["peak_mb"] / summary["trl"]["peak_mb"]
    from importlib.metadata import version

    record = {"command": "python benchmarks/on_policy_step.py " + " ".join(
                  f"--{k} {getattr(a, k)}" for k in ("steps", "rounds", "threads", "device")) + f" --dtype {dtype}",
              "method": __doc__.split("\n\n", 2)[2], "machine": {
                  **machine_record(a.device, dtype), "threads_per_worker": a.threads,
                  "load_average_at_end": os.getloadavg(),
                  "versions": {k: version(k) for k in ("torch", "transformers", "trl", "accelerate", "lmdistill")}},
              "runs": runs, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
