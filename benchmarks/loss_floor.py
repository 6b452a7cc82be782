"""Where the fused loss's CPU time goes, against the naive formula's: the matmul floor at the chunk size the memory
target allows. Answers "why is lmdistill only ~0.75-0.8x naive's time on CPU, not 0.7x" with measurements.

    python benchmarks/loss_floor.py             # ~4 min on 2 cores -> results/loss_floor_cpu.json

Qwen2.5 0.5B/3B sizes (N=1024, student H=896, teacher H=2048, V=151,936), forward KL, fp32, first micro-batch (the
weight gradient is a fresh buffer, as for `naive` and `lmdistill` in benchmarks/loss_engine.py). Each part runs
in its own process (as in loss_engine.py: a process's earlier allocations change later timings), a warmup and
`--repeats` timed repeats, `--rounds` processes per part in alternating order, fastest kept (time only; memory is
loss_engine.py's job):
  naive          the full step of loss_engine.py's naive formula ([N, V] logits)
  lmdistill      the full step of fused_distillation_loss (chunk size from its default memory budget)
  gemm_full      only the four matmuls of the step at N rows (student and teacher logits, the hidden-state and the
                 weight gradients): what naive's matmuls cost
  gemm_chunked   only the same four matmuls, one chunk of C rows at a time, issued as the fused loss issues them
                 (projection.project_logits, _project_back, _add_weight_grad_): the floor of any token-chunked loss
                 whose two [C, V] fp32 logit buffers fit the memory target (C = 256 here)
  elementwise    only the fused loss's elementwise pass (engine.loss_chunk_: softmaxes, KL, gradient) over the chunks
The table gives each as a share of naive's time: if gemm_chunked alone is at or above the 0.7x target, no
elementwise work can reach it at that chunk size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from device import machine_record, results_path
from loss_engine import SHAPES, lmdistill, make_inputs, naive

PARTS = ("naive", "lmdistill", "gemm_full", "gemm_chunked", "elementwise")


def worker(part: str, n: int, vocab: int, repeats: int) -> dict:
    from lmdistill.losses import functional as fn
    from lmdistill.losses import projection
    from lmdistill.losses.engine import KDConfig, loss_chunk_

    hs_dim, ht_dim = SHAPES["qwen"][:2]
    torch.manual_seed(0)
    hs, ws, ht, wt = make_inputs(n, vocab, hs_dim, ht_dim, "cpu", torch.float32)
    labels = torch.zeros(n, dtype=torch.long)
    chunk = fn.auto_chunk_size(vocab, n)
    if part in ("naive", "lmdistill"):
        impl = naive if part == "naive" else lmdistill
        ws.requires_grad_(True)
        hs.requires_grad_(True)

        def run():
            hs.grad = ws.grad = None
            impl(hs, ws, ht, wt, labels, "first").backward()
    elif part == "elementwise":  # the chunks' logits are made here and copied in before each chunk, off the clock
        cfg, logits = KDConfig(), [(hs[i:i + chunk] @ ws.T, ht[i:i + chunk] @ wt.T) for i in range(0, n, chunk)]
        zs_buf, zt_buf = torch.empty(chunk, vocab), torch.empty(chunk, vocab)

        def run():
            total = 0.0
            for zs, zt in logits:
                zs_buf[:len(zs)].copy_(zs), zt_buf[:len(zt)].copy_(zt)
                t0 = time.perf_counter()
                loss_chunk_(zs_buf[:len(zs)], zt_buf[:len(zt)], labels[:len(zs)], cfg, 1.0 / n, True)
                total += time.perf_counter() - t0
            return total
    else:
        g_full = torch.randn(n, vocab).mul_(1e-6)  # a gradient's shape and scale; its values do not change the time
        zs_buf, zt_buf = torch.empty(chunk, vocab), torch.empty(chunk, vocab)

        def run():
            if part == "gemm_full":
                torch.mm(hs, ws.T), torch.mm(ht, wt.T), torch.mm(g_full, ws)
                torch.mm(g_full.T, hs, out=torch.empty(vocab, hs_dim))  # a fresh weight gradient, as autograd makes
                return
            dW = torch.empty(vocab, hs_dim)
            for i, start in enumerate(range(0, n, chunk)):
                h, g = hs[start:start + chunk], g_full[start:start + chunk]
                projection.project_logits(h, ws, None, zs_buf[:len(h)])
                projection.project_logits(ht[start:start + chunk], wt, None, zt_buf[:len(h)])
                projection._project_back(g, ws)
                projection._add_weight_grad_(dW, g, h, i == 0, 1.0, None)
            return
    times = []
    for i in range(repeats + 1):  # the first is a warmup (allocator, MKL), not kept
        t0 = time.perf_counter()
        inner = run()
        if i:
            times.append(inner if inner is not None else time.perf_counter() - t0)
    return {"part": part, "seconds": min(times), "all_seconds": times, "chunk": chunk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=PARTS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    hs_dim, ht_dim, vocab, n = SHAPES["qwen"]
    n, vocab = a.n or n, a.vocab or vocab
    if a.worker:
        print(json.dumps(worker(a.worker, n, vocab, a.repeats)))
        return
    times = {k: [] for k in PARTS}
    print(f"loss floor on cpu: N={n}, V={vocab}, student H={hs_dim}, teacher H={ht_dim}, "
          f"{torch.get_num_threads()} threads; {a.rounds} processes per part, {a.repeats} repeats each")
    chunk = None
    for k in range(a.rounds):  # alternate the order so drifting machine load hits every part alike
        for part in (PARTS if k % 2 == 0 else PARTS[::-1]):
            cmd = [sys.executable, __file__, "--worker", part, "--n", str(n), "--vocab", str(vocab),
                   "--repeats", str(a.repeats)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            times[part] += r["all_seconds"]
            chunk = r["chunk"]
            print(f"  round {k} {part}: {' '.join(f'{x:.3f}' for x in r['all_seconds'])} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    flops = 2 * n * vocab * (3 * hs_dim + ht_dim)
    rows = [{"part": k, "seconds": best[k], "all_seconds": times[k], "vs_naive": best[k] / best["naive"],
             **({"gflops": flops / best[k] / 1e9} if k.startswith("gemm") else {})} for k in PARTS]
    record = {"machine": {**machine_record("cpu", "float32"), "threads": torch.get_num_threads(),
                          "load_average": list(os.getloadavg())},
              "command": " ".join(sys.argv), "n": n, "vocab": vocab, "student_hidden": hs_dim,
              "teacher_hidden": ht_dim, "chunk": chunk, "matmul_gflop": flops / 1e9, "rows": rows,
              "floor_vs_naive": best["gemm_chunked"] / best["naive"],
              "floor_plus_elementwise_vs_naive": (best["gemm_chunked"] + best["elementwise"]) / best["naive"],
              "lmdistill_vs_naive": best["lmdistill"] / best["naive"]}
    print("\n| part | s (best) | x naive | matmul GFLOP/s |\n|---|---|---|---|")
    for r in rows:
        rate = f"{r['gflops']:.0f}" if "gflops" in r else ""
        print(f"| {r['part']} | {r['seconds']:.3f} | {r['vs_naive']:.3f} | {rate} |")
    print(f"\nmatmuls at {chunk}-row chunks alone: {record['floor_vs_naive']:.3f}x naive's step; with the elementwise "
          f"pass {record['floor_plus_elementwise_vs_naive']:.3f}x; the fused loss as a whole "
          f"{record['lmdistill_vs_naive']:.3f}x (target 0.7x)")
    out = results_path("loss_floor", "cpu", False, a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
