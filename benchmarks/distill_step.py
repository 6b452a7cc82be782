"""Distillation-step benchmark: lmdistill's Trainer vs a MiniMind-style loop vs TRL's GKDTrainer, on CPU or a GPU.

    python benchmarks/distill_step.py --threads 1   # all three pairs, ~10 min on 2 cores -> results/distill_step_cpu.json
    python benchmarks/distill_step.py --quick       # micro -> nano, 4 steps, 1-2 min -> results/distill_step_cpu_quick.json
    python benchmarks/distill_step.py --device cuda # bf16 autocast, CUDA events -> results/distill_step_cuda.json
    python benchmarks/distill_step.py --pairs qwen-vocab-512x4->256x2 --vocab_size 8192 --steps 3   # smoke run

--threads 1 when other jobs share the CPU: with one foreign busy thread on this 2-core VM, 2-thread kernels stall at
their barriers (a micro forward took 1.86 s with 2 threads, 0.39 s with 1), which distorts every ratio.

One off-policy step = teacher forward (no grad) + student forward/backward + AdamW step; forward KL at T=1,
alpha 0; the same models (teacher: its preset built with seed 0 and saved once with the tokenizer; student: its
preset built after `set_seed(0)`, in the order `lmdistill distill` uses, or for a pair with its own sizes built once
the same way and saved), the same data (tinyshakespeare packed into blocks by `lmdistill.data.load_examples`,
batches in the Trainer's seeded order), AdamW lr 1e-4, weight decay 0.01, grad-norm clip 1.0. Pairs (`--pairs`):
  micro->nano                 teacher 256x4, student 128x2 (Qwen3-style presets), 256 tokens, batch 8
  minimind2->minimind2-small  teacher 768x16, student 512x8 (Llama-style), 128 tokens, batch 8
  qwen-vocab-512x4->256x2     teacher 512 hidden x 4 layers, student 256 x 2, Qwen3-style (the `micro` preset's
                              family: q/k norm, SiLU MLP, tied embeddings) with Qwen's vocabulary of 151,936 rows;
                              512 tokens, batch 4. The token ids come from the MiniMind tokenizer (6,400 tokens), so
                              rows above 6,400 never appear as an input or a label, but the KD loss still compares all
                              151,936 logits of both models in every implementation (lmdistill compares every row
                              when the two lm_heads have the same size). This is where the output layer and the loss
                              dominate the step, as at Qwen scale. `--vocab_size` shrinks it for a smoke run.
Devices: fp32 on CPU; on CUDA `--dtype bfloat16` (the default there) means bf16 autocast over fp32 student weights
for all three (lmdistill `--dtype bfloat16`, MiniMind's `torch.autocast`, TRL `bf16=True`) and bf16 teacher
weights (lmdistill's default under bf16; the other two are handed the teacher in bf16 too).
Implementations, each in its own process:
  lmdistill  lmdistill.train.loop.Trainer, options parsed as the CLI parses them; step() (one optimizer
             step)
  minimind   student(ids).logits, teacher(ids).logits under no_grad, F.kl_div(log_softmax, softmax, batchmean)
             on the trained positions, backward, clip, AdamW (MiniMind's train_distillation.py at alpha 0)
  trl        trl.experimental.gkd.GKDTrainer: lmbda=0 (off-policy), beta=0 (forward KL), temperature=1, seq_kd=False,
             the same token ids through a pass-through collator and a sequential sampler, optim adamw_torch;
             bf16 (True only under --dtype bfloat16, the CUDA default) and gradient_checkpointing=False given
             explicitly (TRL defaults both to True)
  trl_defaults  (only with --impls, for context) the same GKDTrainer with TRL's own defaults: bf16 autocast,
             gradient checkpointing, fused AdamW
The processes load side by side, then step in lockstep: one implementation computes at a time, in rotating
order, so all three see the same (drifting) load from other jobs. Step time: the whole step for lmdistill and
minimind (batch padding included); on_step_begin -> on_step_end for trl (its batch is fetched before); wall time on
CPU, CUDA events on a GPU. tokens/s = non-pad tokens / step time, median over the steps after warmup. Memory: on CPU
the RSS high-water mark is reset (/proc/self/clear_refs) once models, data and trainer are built; peak = high-water
RSS over the steps, above baseline = peak - RSS at that reset; on CUDA the same with torch.cuda's allocated memory
(reset_peak_memory_stats, max_memory_allocated). FLOP/s: nanoGPT's count (see `flops_per_token`) / step time, as a
fraction of a timed square matmul: 2048^3 fp32 on CPU right after each step in the same process (same load), median;
8192^3 in the run's dtype on CUDA, timed after the last step (a GPU is not shared, and its buffers stay out of the
peak).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from device import DATA_DIR, Clock, Memory, add_device_options, is_cuda, machine_record, resolve, results_path

DATA = DATA_DIR / "tinyshakespeare.txt"
MINIMIND_TOKENIZER = DATA_DIR / "minimind_tokenizer"


@dataclass(frozen=True)
class Pair:
    """A teacher and a student: presets with optional size knobs (hidden_size, num_layers), and a vocabulary of
    their own (None: the tokenizer's)."""

    teacher: str
    student: str
    seq_len: int
    steps: int  # of the full run
    batch: int = 8
    teacher_knobs: tuple = ()
    student_knobs: tuple = ()
    vocab_size: int | None = None

    @property
    def own_student(self) -> bool:
        """Built once by the driver and saved (sizes or a vocabulary the CLI's preset knobs do not take)."""
        return bool(self.student_knobs) or self.vocab_size is not None


QWEN_VOCAB = 151_936
PAIRS = {
    "micro->nano": Pair("micro", "nano", 256, 12),
    "minimind2->minimind2-small": Pair("minimind2", "minimind2-small", 128, 6),
    "qwen-vocab-512x4->256x2": Pair("micro", "micro", 512, 6, batch=4,
                                    teacher_knobs=(("hidden_size", 512), ("num_layers", 4)),
                                    student_knobs=(("hidden_size", 256), ("num_layers", 2)), vocab_size=QWEN_VOCAB),
}
IMPLS = ["lmdistill", "minimind", "trl"]
SEED, LR, WEIGHT_DECAY, CLIP = 0, 1e-4, 0.01, 1.0
TARGET_SPEED, TARGET_MEMORY = 1.5, 0.6  # vs TRL: >= 1.5x tokens/s at <= 0.6x peak memory
MATMUL = {"cpu": 2048, "cuda": 8192}  # side of the square matmul whose measured rate FLOP/s are a fraction of


# -- measurements shared by the workers ----------------------------------------------------------------------
def flops_per_token(model, seq_len: int, train: bool) -> float:
    """nanoGPT's estimate_mfu count: 6 N + 12 L A T for training, 2 N + 4 L A T for a forward, where N counts every
    matmul weight (decoder + lm_head V x H, not the input-embedding lookup), A = heads x head_dim, T = seq_len
    (attention counted non-causal). Norms, softmax and the KD loss's elementwise work are left out."""
    c = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()
    n = sum(p.numel() for p in model.parameters()) - embed.numel() + (head.numel() if tied else 0)
    attn = c.num_hidden_layers * c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    return 6 * n + 12 * attn * seq_len if train else 2 * n + 4 * attn * seq_len


def run_plan(teacher_dir: str, student: str, pair: Pair, steps: int, out_dir: str, device: str, dtype: str):
    """The `lmdistill distill` run plan through the Python API (the CLI's own declarations and checks)."""
    from lmdistill import DistillConfig
    from lmdistill.api import plan

    return plan(DistillConfig(
        teacher=[teacher_dir], student=student, data=str(DATA), output_dir=out_dir, max_steps=steps,
        batch_size=pair.batch, learning_rate=LR, weight_decay=WEIGHT_DECAY, grad_clip=CLIP, max_seq_len=pair.seq_len,
        divergence="forward_kl", temperature=1.0, alpha=0.0, dtype=dtype, device=device, seed=SEED))


def load_pair(teacher_dir: str, student: str, seq_len: int, device: str, dtype: str):
    """Tokenizer, frozen teacher, student and examples, built in the order `lmdistill.train.setup.build` uses (the
    teacher in bf16 under bf16, as lmdistill loads it; the student's weights in fp32)."""
    from accelerate.utils import set_seed

    from lmdistill.data import load_examples
    from lmdistill.models import load_model, load_teacher
    from lmdistill.tokenizer import load_tokenizer

    set_seed(SEED)
    where = device if is_cuda(device) else None  # on CPU loaded exactly as before (no device_map)
    tok = load_tokenizer(teacher_dir, "--teacher")
    teacher = load_teacher(teacher_dir, dtype=dtype, tokenizer=tok, device=where, verbose=False)
    model = load_model(student, tokenizer=tok, dtype="float32", device=where, verbose=False)
    return tok, teacher, model, load_examples(str(DATA), tok, seq_len)


def step_examples(examples, steps: int, batch: int) -> list[list[dict]]:
    """The examples of steps 0..steps-1 in the Trainer's order (1 process, no accumulation)."""
    from lmdistill.train.batches import ExampleStream

    stream = ExampleStream(len(examples), SEED)
    return [[examples[stream[i]] for i in range(s * batch, (s + 1) * batch)] for s in range(steps)]


# -- the worker's side: one process per implementation, stepping only when the driver says so -----------------
class Session:
    """Lockstep with the driver: before each step the worker prints "@@waiting" and blocks on stdin until "go",
    so exactly one implementation computes at a time and all three see the same (shared, drifting) machine load."""

    def __init__(self, device: str, dtype: str):
        self.rows, self.matmul, self.device = [], [], device
        self.cuda = is_cuda(device)
        self.clock, self.memory = Clock(device), Memory(device)
        side = MATMUL["cuda" if self.cuda else "cpu"]
        self.mm_dtype = getattr(torch, dtype) if self.cuda else torch.float32
        if not self.cuda:  # held from the start, inside the baseline: timed after every step
            self.a, self.b, self.c = (torch.randn(side, side), torch.randn(side, side), torch.empty(side, side))

    def ready(self, teacher, student, first_batch) -> None:
        self.teacher, self.student = teacher, student
        self.init_checksum = float(sum(p.detach().double().abs().sum() for p in student.parameters()))
        self.first_ids = sum(sum(i * (k + 1) for k, i in enumerate(e["input_ids"])) for e in first_batch) % 1_000_000_007
        if not self.cuda:
            torch.mm(self.a, self.b, out=self.c)
        self.load_peak = self.memory.peak()
        self.base, self.reset = self.memory.reset()

    def wait(self) -> str:
        _send("waiting")
        return sys.stdin.readline().strip()

    def begin(self) -> None:
        if self.wait() != "go":
            raise SystemExit("driver went away")
        self.clock.start()

    def end(self, tokens: int, loss: float | None = None) -> None:
        seconds = self.clock.stop()
        self.rows.append((seconds, tokens, loss))
        if not self.cuda:
            self.matmul.append(2 * MATMUL["cpu"] ** 3 / _timed(lambda: torch.mm(self.a, self.b, out=self.c)))
        _send("step", {"seconds": seconds, "tokens": tokens})

    def finish(self) -> float:
        """The peak over the steps (read first), then on CUDA the matmul rate, once per step."""
        peak = self.memory.peak() if self.reset else max(self.memory.peak(), self.load_peak)
        if self.cuda:
            side = MATMUL["cuda"]
            a, b = (torch.randn(side, side, device=self.device, dtype=self.mm_dtype) for _ in range(2))
            c, clock = torch.empty_like(a), Clock(self.device)
            for _ in range(3):  # warm-up: cuBLAS picks its kernel
                torch.mm(a, b, out=c)
            for _ in self.rows:
                clock.start()
                torch.mm(a, b, out=c)
                self.matmul.append(2 * side**3 / clock.stop())
        return peak


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _send(tag: str, payload: dict | None = None) -> None:
    print(f"@@{tag} {json.dumps(payload or {})}", flush=True)


def run_lmdistill(pair, steps, teacher_dir, student, tmp, session, device, dtype):
    from lmdistill.train.loop import Trainer

    p = PAIRS[pair]
    trainer = Trainer(run_plan(teacher_dir, student, p, steps, str(Path(tmp) / "lmdistill"), device, dtype))
    trainer.model.train()
    session.ready(trainer.teacher.model, trainer.acc.unwrap_model(trainer.model),
                  [trainer.examples[trainer.source.stream[i]] for i in range(p.batch)])
    for step in range(steps):
        session.begin()
        stats = trainer.step()
        session.end(stats["tokens"], stats["kd_loss"])


def run_minimind(pair, steps, teacher_dir, student, tmp, session, device, dtype):
    import torch.nn.functional as F

    from lmdistill.data import pad_batch

    p = PAIRS[pair]
    tok, teacher, model, examples = load_pair(teacher_dir, student, p.seq_len, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    plan = step_examples(examples, steps, p.batch)
    autocast = (torch.autocast("cuda" if is_cuda(device) else "cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())  # MiniMind's autocast_ctx; softmax/log_softmax run in fp32 under it
    session.ready(teacher, model, plan[0])
    for step in range(steps):
        session.begin()
        b = {k: v.to(device) for k, v in pad_batch(plan[step], tok.pad_token_id).items()}
        with autocast:
            s_logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
            with torch.no_grad():
                t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            mask = b["labels"][:, 1:] != -100  # logits at t predict token t + 1
            s, t = s_logits[:, :-1][mask], t_logits[:, :-1][mask]  # (N, V)
            loss = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")  # * T^2 with T = 1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        session.end(int(b["attention_mask"].sum()), loss.item())


def run_trl(pair, steps, teacher_dir, student, tmp, session, device, dtype, trl_defaults=False):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from lmdistill.data import pad_batch

    p = PAIRS[pair]
    tok, teacher, model, examples = load_pair(teacher_dir, student, p.seq_len, device, dtype)
    plan = step_examples(examples, steps, p.batch)
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for batch in plan for e in batch]
    tokens, losses = [], []

    class Lockstep(TrainerCallback):  # the batch is already fetched when on_step_begin runs
        def on_step_begin(self, args, state, control, **kw):
            session.begin()

        def on_step_end(self, args, state, control, **kw):
            session.end(tokens[state.global_step - 1])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    def collate(features):  # the same token ids, padded as lmdistill pads them
        batch = pad_batch(features, tok.pad_token_id)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    matched = dict(bf16=dtype == "bfloat16", gradient_checkpointing=False, optim="adamw_torch")
    config = GKDConfig(
        output_dir=str(Path(tmp) / "trl"), lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        per_device_train_batch_size=p.batch, max_steps=steps, learning_rate=LR, weight_decay=WEIGHT_DECAY,
        max_grad_norm=CLIP, lr_scheduler_type="constant", use_cpu=not is_cuda(device), report_to=[],
        save_strategy="no", dataloader_num_workers=0, train_sampling_strategy="sequential", logging_steps=1,
        disable_tqdm=True, seed=SEED, max_length=None, **({} if trl_defaults else matched))
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=config, data_collator=collate,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Lockstep()])
    session.ready(teacher, trainer.model, plan[0])
    trainer.train()
    if losses:  # one log per step (logging_steps=1): the first is step 1's loss
        session.rows[0] = session.rows[0][:2] + (losses[0],)


RUNNERS = {"lmdistill": run_lmdistill, "minimind": run_minimind, "trl": run_trl,
           "trl_defaults": lambda *a: run_trl(*a, trl_defaults=True)}  # context only: bf16 autocast + checkpointing


def worker(impl: str, pair: str, steps: int, warmup: int, teacher_dir: str, student: str, threads: int, device: str,
           dtype: str) -> dict:
    p = PAIRS[pair]
    torch.set_num_threads(threads)
    session = Session(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        RUNNERS[impl](pair, steps, teacher_dir, student, tmp, session, device, dtype)
        peak = session.finish()
        session.wait()  # "finish"
    s = session
    times, tokens = [r[0] for r in s.rows], [r[1] for r in s.rows]
    measured = range(warmup, steps)
    fl_tok = flops_per_token(s.student, p.seq_len, True) + flops_per_token(s.teacher, p.seq_len, False)
    step_flops = [fl_tok * tokens[i] / times[i] for i in measured]
    return {
        "impl": impl, "pair": pair, "teacher": _describe(p.teacher, p.teacher_knobs),
        "student": _describe(p.student, p.student_knobs),
        "vocab_size": s.student.get_output_embeddings().weight.shape[0],
        "seq_len": p.seq_len, "batch": p.batch, "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
        "device": device, "dtype": dtype,
        "step_seconds": times, "step_tokens": tokens, "median_step_seconds": statistics.median(times[i] for i in measured),
        "tokens_per_sec": statistics.median(tokens[i] / times[i] for i in measured),
        "first_step_kd_loss": s.rows[0][2], "student_init_checksum": s.init_checksum, "first_batch_ids": s.first_ids,
        "baseline_mb": s.base, "peak_mb": peak, "above_baseline_mb": peak - s.base, "load_peak_mb": s.load_peak,
        "peak_reset": s.reset, "flops_per_token": fl_tok, "flops_per_sec": statistics.median(step_flops),
        "matmul_side": MATMUL["cuda" if s.cuda else "cpu"], "matmul_flops_after_each_step": s.matmul,
        "matmul_peak_flops": max(s.matmul),
        "fraction_of_matmul_peak": statistics.median(f / s.matmul[i] for f, i in zip(step_flops, measured)),
    }


def _describe(preset: str, knobs: tuple) -> str:
    return preset + "".join(f" {k}={v}" for k, v in knobs)


# -- the driver ----------------------------------------------------------------------------------------------
def prepare_teacher(preset: str, tokenizer, folder: Path, **knobs) -> None:
    """Build the teacher preset (with size knobs / vocab_size, if any) with seed 0 and save it with the tokenizer
    (the Trainer loads teachers from disk)."""
    from transformers.utils import logging

    from lmdistill.models import load_model

    logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = load_model(preset, tokenizer=tokenizer, dtype="float32", verbose=False, **knobs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare_student(pair: Pair, tokenizer, folder: Path, vocab_size: int | None) -> str:
    """The student every implementation loads: the preset name, or for a pair with its own sizes or vocabulary a
    folder with the model built after `set_seed(0)` (as lmdistill builds a preset student) and saved."""
    if not pair.own_student:
        return pair.student
    from accelerate.utils import set_seed

    from lmdistill.models import load_model

    set_seed(SEED)
    knobs = dict(pair.student_knobs, **({"vocab_size": vocab_size} if vocab_size else {}))
    load_model(pair.student, tokenizer=tokenizer, dtype="float32", verbose=False, **knobs).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def get_tokenizer(kind: str):
    if kind == "bpe2048":
        from lmdistill.tokenizer import train_tokenizer

        return train_tokenizer(texts=[DATA.read_text()], vocab_size=2048)
    from lmdistill.tokenizer import load_tokenizer

    return load_tokenizer(str(MINIMIND_TOKENIZER))


class Worker:
    """The driver's handle on one worker process: commands on its stdin, "@@tag {json}" lines on its stdout."""

    def __init__(self, impl, pair, steps, warmup, teacher_dir, student, threads, device, dtype, log_dir):
        self.impl, self.log = impl, Path(log_dir) / f"{impl}.stderr"
        cmd = [sys.executable, __file__, "--worker", impl, "--pair", pair, "--steps", str(steps), "--warmup",
               str(warmup), "--teacher_dir", teacher_dir, "--student", student, "--threads", str(threads),
               "--device", device, "--dtype", dtype]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def expect(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(f"@@{tag} "):
                return json.loads(line[len(tag) + 3:])
        self.proc.wait()
        raise RuntimeError(f"{self.impl} worker exited (code {self.proc.returncode}) before '@@{tag}':\n"
                           f"{self.log.read_text()[-3000:]}")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()


def run_pair(pair, impls, steps, warmup, teacher_dir, student, threads, device, dtype) -> list[dict]:
    """All implementations load side by side, then step in lockstep, one at a time, in rotating order."""
    with tempfile.TemporaryDirectory() as logs:
        workers = [Worker(impl, pair, steps, warmup, teacher_dir, student, threads, device, dtype, logs)
                   for impl in impls]
        alive = []
        for w in workers:
            try:
                w.expect("waiting")
                alive.append(w)
            except RuntimeError as exc:
                print(f"  {w.impl} {pair}: failed\n{exc}", file=sys.stderr)
        for step in range(steps):
            for w in alive[step % len(alive):] + alive[:step % len(alive)]:
                try:
                    w.send("go")
                    r = w.expect("step")
                    w.expect("waiting")
                except (RuntimeError, BrokenPipeError) as exc:
                    print(f"  {w.impl} {pair}: failed at step {step + 1}\n{exc}", file=sys.stderr)
                    alive.remove(w)
                    continue
                print(f"  step {step + 1}/{steps} {w.impl:12s} {r['seconds']:6.3f} s", flush=True)
        results = []
        for w in alive:
            w.send("finish")
            r = w.expect("result")
            w.proc.wait()
            results.append(r)
            print(f"  {w.impl:12s} {pair:28s} {r['tokens_per_sec']:7.0f} tok/s  step {r['median_step_seconds']:6.3f} s  "
                  f"peak {r['peak_mb']:6.0f} MiB  above baseline {r['above_baseline_mb']:6.0f} MiB  "
                  f"{r['fraction_of_matmul_peak']:.0%} of matmul  first KD loss {r['first_step_kd_loss']}", flush=True)
    return results


def summarize(runs: list[dict]) -> dict:
    out = {}
    for pair in dict.fromkeys(r["pair"] for r in runs):
        by = {r["impl"]: r for r in runs if r["pair"] == pair}
        trl = by.get("trl")
        s = {}
        for impl, r in by.items():
            if trl:
                s[impl] = {"speed_vs_trl": r["tokens_per_sec"] / trl["tokens_per_sec"],
                           "speed_vs_trl_load_normalized": r["fraction_of_matmul_peak"] / trl["fraction_of_matmul_peak"],
                           "peak_vs_trl": r["peak_mb"] / trl["peak_mb"],
                           "above_baseline_vs_trl": r["above_baseline_mb"] / trl["above_baseline_mb"]}
        if trl and "lmdistill" in by:
            ours = s["lmdistill"]
            s["targets_met"] = {"speed": ours["speed_vs_trl"] >= TARGET_SPEED,
                                "peak_memory": ours["peak_vs_trl"] <= TARGET_MEMORY,
                                "above_baseline_memory": ours["above_baseline_vs_trl"] <= TARGET_MEMORY}
        s["same_first_batch"] = len({r["first_batch_ids"] for r in by.values()}) == 1
        s["same_student_init"] = len({round(r["student_init_checksum"], 3) for r in by.values()}) == 1
        losses = [r["first_step_kd_loss"] for r in by.values() if r["first_step_kd_loss"] is not None]
        s["first_step_kd_loss_spread"] = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12) if losses else None
        out[pair] = s
    return out


def print_table(runs: list[dict], summary: dict) -> None:
    print("\n| pair | implementation | tokens/s | step s | peak MiB | above baseline MiB | tokens/s vs TRL | "
          "peak vs TRL | above-baseline vs TRL | FLOP/s | % of matmul (max) | first-step KD loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        s = summary[r["pair"]].get(r["impl"], {})
        ratio = lambda k: f"{s[k]:.2f}x" if k in s else "-"  # noqa: E731
        print(f"| {r['pair']} (T={r['seq_len']}) | {r['impl']} | {r['tokens_per_sec']:.0f} | "
              f"{r['median_step_seconds']:.3f} | {r['peak_mb']:.0f} | {r['above_baseline_mb']:.0f} | "
              f"{ratio('speed_vs_trl')} | {ratio('peak_vs_trl')} | {ratio('above_baseline_vs_trl')} | "
              f"{r['flops_per_sec'] / 1e9:.1f} G | {100 * r['fraction_of_matmul_peak']:.0f}% "
              f"(of {r['matmul_peak_flops'] / 1e9:.0f} G) | {r['first_step_kd_loss']:.4f} |")
    print()
    for pair, s in summary.items():
        if "targets_met" in s:
            t, o = s["targets_met"], s["lmdistill"]
            print(f"{pair}: tokens/s {o['speed_vs_trl']:.2f}x TRL ({o['speed_vs_trl_load_normalized']:.2f}x as fractions "
                  f"of the matmul rate; target >= {TARGET_SPEED}x: "
                  f"{'met' if t['speed'] else 'NOT met'}); peak memory {o['peak_vs_trl']:.2f}x TRL (target <= "
                  f"{TARGET_MEMORY}x: {'met' if t['peak_memory'] else 'NOT met'}); memory above baseline "
                  f"{o['above_baseline_vs_trl']:.2f}x TRL ({'met' if t['above_baseline_memory'] else 'NOT met'}); "
                  f"same first batch / student init / first-step KD loss (rel. spread) in every implementation: "
                  f"{s['same_first_batch']} / {s['same_student_init']} / {s['first_step_kd_loss_spread']:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(RUNNERS))
    p.add_argument("--pair", choices=list(PAIRS))
    p.add_argument("--teacher_dir")
    p.add_argument("--student", help="(worker) the student preset or folder")
    p.add_argument("--steps", type=int, default=None, help="steps per implementation, warmup included (default: "
                   + ", ".join(f"{v.steps} for {k}" for k, v in PAIRS.items()) + "; 4 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the median")
    p.add_argument("--pairs", default=None, help="comma-separated pair names (default: all; --quick: micro->nano)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(RUNNERS)} "
                   "(trl_defaults: TRL's own defaults bf16 autocast, gradient checkpointing, fused AdamW; not fp32)")
    p.add_argument("--tokenizer", default="minimind", choices=["minimind", "bpe2048"],
                   help=f"minimind: {MINIMIND_TOKENIZER} (6,400); bpe2048: trained on the data")
    p.add_argument("--vocab_size", type=int, default=None,
                   help=f"the vocabulary of pairs that have their own ({QWEN_VOCAB:,} for qwen-vocab-512x4->256x2), "
                        "e.g. 8192 for a smoke run; at least the tokenizer's size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads per worker (default: all cores; 1 is steadier when other jobs share the CPU)")
    add_device_options(p)
    p.add_argument("--quick", action="store_true", help="micro -> nano only, 4 steps (1 warmup)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = resolve(p, a.device, a.dtype)
    if a.worker:
        _send("result", worker(a.worker, a.pair, a.steps, a.warmup, a.teacher_dir, a.student, a.threads, a.device,
                               dtype))
        return
    if not DATA.is_file() or (a.tokenizer == "minimind" and not MINIMIND_TOKENIZER.is_dir()):
        print(f"skipped: needs {DATA} and {MINIMIND_TOKENIZER} (or --tokenizer bpe2048); not found.")
        return
    pairs = a.pairs.split(",") if a.pairs else (["micro->nano"] if a.quick else list(PAIRS))
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    impls = a.impls.split(",")
    if set(impls) - set(RUNNERS) or set(pairs) - set(PAIRS):
        p.error(f"--impls takes {', '.join(RUNNERS)}; --pairs takes {', '.join(PAIRS)}; found {a.impls} / {','.join(pairs)}")
    tokenizer = get_tokenizer(a.tokenizer)
    if a.vocab_size is not None and a.vocab_size < len(tokenizer):
        p.error(f"--vocab_size {a.vocab_size}: expected at least the tokenizer's {len(tokenizer)} tokens")
    where = (f"on {machine_record(a.device, dtype)['device_name']} ({a.device})" if is_cuda(a.device) else
             f"on CPU ({a.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"distillation step {where}: {dtype}, forward KL T=1, alpha 0, tokenizer {a.tokenizer} ({len(tokenizer)}), "
          f"{warmup} warmup steps")
    if not is_cuda(a.device) and os.getloadavg()[0] >= os.cpu_count() and a.threads > 1:
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other jobs share the CPU and "
              "multi-threaded small ops stall at their barriers; ratios are steadier with --threads 1.")
    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in pairs:
            spec = PAIRS[pair]
            vocab = (a.vocab_size or spec.vocab_size) if spec.vocab_size else None
            teacher_dir, student_dir = Path(tmp) / pair.split("->")[0], Path(tmp) / f"student-{pair.split('->')[1]}"
            prepare_teacher(spec.teacher, tokenizer, teacher_dir,
                            **dict(spec.teacher_knobs, **({"vocab_size": vocab} if vocab else {})))
            student = prepare_student(spec, tokenizer, student_dir, vocab)
            steps = a.steps or (4 if a.quick else spec.steps)
            print(f"{pair}: teacher {_describe(spec.teacher, spec.teacher_knobs)}, student "
                  f"{_describe(spec.student, spec.student_knobs)}, vocabulary {vocab or len(tokenizer):,}, "
                  f"batch {spec.batch} x {spec.seq_len} tokens, {steps} steps", flush=True)
            runs += run_pair(pair, impls, steps, warmup, str(teacher_dir), student, a.threads, a.device, dtype)
    summary = summarize(runs)
    print_table(runs, summary)
    out = results_path("distill_step", a.device, a.quick, a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine_record(a.device, dtype), "threads_per_worker": a.threads,
               "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(), "versions": _versions()}
    out.write_text(json.dumps({"machine": machine, "tokenizer": a.tokenizer, "command": " ".join(sys.argv),
                               "method": method(a.device, dtype), "runs": runs, "summary": summary}, indent=2))
    print(f"saved {out}")


def method(device: str, dtype: str) -> dict:
    cuda = is_cuda(device)
    precision = ("bf16 autocast over fp32 student weights, bf16 teacher weights" if dtype == "bfloat16" else dtype)
    return {
        "step": "teacher forward (no grad) + student forward/backward + grad clip 1.0 + AdamW(lr 1e-4, wd 0.01); "
                f"batch per pair (8; 4 for qwen-vocab-512x4->256x2), {precision}, forward KL at T=1, alpha 0",
        "tokens_per_sec": f"non-pad tokens / step {'GPU time (CUDA events)' if cuda else 'wall time'}, median over the "
                          "steps after warmup; implementations step in lockstep, one at a time, rotating order",
        "memory": ("peak_mb = torch.cuda.max_memory_allocated over the steps (reset_peak_memory_stats after models, "
                   "data and trainer are built); above_baseline_mb = peak_mb - memory_allocated at that reset"
                   if cuda else
                   "peak_mb = RSS high-water mark over the steps (reset via /proc/self/clear_refs after models, data "
                   "and trainer are built); above_baseline_mb = peak_mb - RSS at that reset") +
                  "; load_peak_mb = lifetime peak before the reset",
        "flops": "per token: student 6*N_s + 12*L_s*A_s*T, teacher 2*N_t + 4*L_t*A_t*T; N = matmul weights (decoder + "
                 "lm_head V*H, no input-embedding lookup), A = heads*head_dim, T = seq_len (attention non-causal, "
                 "nanoGPT estimate_mfu); loss elementwise work not counted",
        "fraction_of_matmul_peak": (f"median over steps of step FLOP/s / FLOP/s of a {MATMUL['cuda']}^3 {dtype} "
                                    "torch.mm timed once per step after the last step (CUDA events)" if cuda else
                                    f"median over steps of step FLOP/s / FLOP/s of a {MATMUL['cpu']}^3 fp32 torch.mm "
                                    "timed right after that step in the same process"),
    }


def _versions() -> dict:
    from importlib.metadata import version

    return {k: version(k) for k in ("transformers", "trl", "accelerate", "lmdistill")}


if __name__ == "__main__":
    main()
