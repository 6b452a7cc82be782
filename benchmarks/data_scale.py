"""The data path at corpus scale: the tokenized store against the in-memory loader, and packing.

    python benchmarks/data_scale.py                  # 20k and 80k conversations, ~15 min on 2 cores
    python benchmarks/data_scale.py --sizes 2000 --skip_packing   # a smoke run

Corpus: real conversations from ../shared/data (KdConv's Chinese dialogs, cut into 1-3-turn conversations, and the
Chinese and English alpaca records), cycled to the size asked for; each copy's first user turn starts with its
record number, so no two records are the same. The MiniMind tokenizer, `--max_seq_len 512`.

Each measurement runs in its own process (one thread), so its peak RSS (VmHWM) is its own:
  build     `load_examples` into a new store with --num_proc 1 and 2: seconds, peak RSS
  reopen    a second `load_examples` of the same inputs: seconds
  read      a pass over every example of the opened store: seconds, peak RSS
  loader    the in-memory loader (`tokenize_examples`, what `load_examples` was) at the smallest size: seconds, RSS
  packing   trained tokens/s of `distill` steps (micro -> nano, batch 8, --max_seq_len 2048) with and without
            --packing, the same examples per step

Prints a table and writes benchmarks/results/data_scale_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device import DATA_DIR, machine_record, results_path

MAX_SEQ_LEN = 512


def corpus(n: int, path: Path) -> Path:
    """n real conversations (1-3 turns) as MiniMind JSONL."""
    rng = random.Random(0)
    pool: list[list[dict]] = []
    for line in (DATA_DIR / "kdconv_zh_dialogs.jsonl").read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        for start in range(0, len(turns) - 1, 2):
            k = rng.randint(1, 3)
            chunk = turns[start:start + 2 * k]
            if len(chunk) >= 2 and chunk[0]["role"] == "user":
                pool.append(chunk)
    for name in ("alpaca_zh_demo.json", "alpaca_en_demo.json"):
        for r in json.loads((DATA_DIR / name).read_text(encoding="utf-8")):
            prompt = r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")
            pool.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}])
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = [dict(t) for t in pool[i % len(pool)]]
            turns[0]["content"] = f"[{i}] {turns[0]['content']}"
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return path


WORKER = r"""
import json, os, sys, time
job, data, cache, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[5])
t0 = time.perf_counter()
if job == "loader":
    examples = tokenize_examples(data, tok, %d)
elif job == "read":
    examples = load_examples(data, tok, %d, cache_dir=cache)
    t0 = time.perf_counter()
    tokens = sum(len(examples[i]["input_ids"]) for i in range(len(examples)))
else:
    examples = load_examples(data, tok, %d, num_proc=num_proc, cache_dir=cache)
seconds = time.perf_counter() - t0
status = open("/proc/self/status").read().splitlines()
kib = lambda key: int(next(l for l in status if l.startswith(key)).split()[1])
print(json.dumps({"seconds": seconds, "examples": len(examples), "tokens": examples.stats.tokens,
                  "peak_rss_mb": kib("VmHWM:") / 1024, "rss_anon_mb": kib("RssAnon:") / 1024}))
""" % (MAX_SEQ_LEN, MAX_SEQ_LEN, MAX_SEQ_LEN)

PACKING = r"""
import json, sys, time, statistics
import torch
torch.set_num_threads(1)
from lmdistill import DistillConfig
from lmdistill.api import plan
from lmdistill.train.loop import Trainer
teacher, data, out, packing, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
trainer = Trainer(plan(DistillConfig(teacher=[teacher], student="nano", data=data, output_dir=out, max_steps=100,
                                     batch_size=8, max_seq_len=2048, packing=packing, seed=0, device="cpu")))
trainer.model.train()
rates, cells, real = [], 0, 0
for step in range(steps):
    batch = trainer.micro_batches(step)[0]
    cells, real = cells + batch.input_ids.numel(), real + int(batch.attention_mask.sum())
    t0 = time.perf_counter()
    stats = trainer.step()
    if step:
        rates.append(stats["trained_tokens"] / (time.perf_counter() - t0))
trainer.close()
print(json.dumps({"trained_tokens_per_sec": statistics.median(rates), "padding_share": 1 - real / cells}))
"""


def run(script: str, *args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,80000")
    p.add_argument("--packing_steps", type=int, default=6)
    p.add_argument("--skip_packing", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tokenizer = DATA_DIR / "minimind_tokenizer"
    if not tokenizer.is_dir():
        raise SystemExit(f"skipped: needs {DATA_DIR}/minimind_tokenizer and the dialog files")
    sizes = [int(x) for x in a.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lmdistill-data-scale-"))
    result = {"machine": machine_record("cpu", "float32"), "date": time.strftime("%Y-%m-%d"), "max_seq_len": MAX_SEQ_LEN,
              "command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]), "sizes": {}}
    print(f"{'records':>8} {'job':<12} {'seconds':>8} {'peak RSS MiB':>13} {'anon MiB':>9} {'examples':>9}")
    for n in sizes:
        data = corpus(n, work / f"corpus_{n}.jsonl")
        rows = {}
        for procs in (1, 2):
            rows[f"build_{procs}"] = run(WORKER, "build", data, work / f"cache_{n}_{procs}", procs, tokenizer)
        rows["reopen"] = run(WORKER, "build", data, work / f"cache_{n}_2", 2, tokenizer)
        rows["read"] = run(WORKER, "read", data, work / f"cache_{n}_2", 1, tokenizer)
        if n == min(sizes):
            rows["loader"] = run(WORKER, "loader", data, work / "unused", 1, tokenizer)
        for job, r in rows.items():
            print(f"{n:>8} {job:<12} {r['seconds']:>8.2f} {r['peak_rss_mb']:>13.0f} {r['rss_anon_mb']:>9.0f} "
                  f"{r['examples']:>9,}")
        rows["speedup_2_procs"] = rows["build_1"]["seconds"] / rows["build_2"]["seconds"]
        result["sizes"][n] = rows
    if len(sizes) > 1:
        small, large = result["sizes"][min(sizes)], result["sizes"][max(sizes)]
        result["summary"] = {
            "build_speedup_2_procs": {n: r["speedup_2_procs"] for n, r in result["sizes"].items()},
            "reopen_seconds_largest": large["reopen"]["seconds"],
            "build_peak_rss_growth_mb": large["build_2"]["peak_rss_mb"] - small["build_2"]["peak_rss_mb"],
            "read_peak_rss_growth_mb": large["read"]["peak_rss_mb"] - small["read"]["peak_rss_mb"],
            "read_anon_growth_mb": large["read"]["rss_anon_mb"] - small["read"]["rss_anon_mb"],
        }
    if not a.skip_packing:
        from lmdistill.models import load_model
        from lmdistill.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        teacher = work / "teacher"
        load_model("micro", tokenizer=tok, verbose=False).save_pretrained(teacher)
        tok.save_pretrained(teacher)
        data = work / f"corpus_{min(sizes)}.jsonl"
        packed = {flag: run(PACKING, teacher, data, work / f"run_{flag}", flag, a.packing_steps) for flag in (0, 1)}
        result["packing"] = {"without": packed[0], "with": packed[1],
                             "speedup": packed[1]["trained_tokens_per_sec"] / packed[0]["trained_tokens_per_sec"]}
        print(f"packing: {packed[0]['trained_tokens_per_sec']:.0f} -> {packed[1]['trained_tokens_per_sec']:.0f} trained "
              f"tokens/s ({result['packing']['speedup']:.2f}x) at --max_seq_len 2048, batch 8; padding share "
              f"{packed[0]['padding_share']:.0%} -> {packed[1]['padding_share']:.0%}")
    out = Path(a.out) if a.out else results_path("data_scale", "cpu")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
