"""Loss-engine benchmark at Qwen2.5 sizes: one forward + backward of the KD loss to the student.

    python benchmarks/loss_engine.py            # full run (~13 min on 2 CPU cores), writes results/loss_engine_<device>.json
    python benchmarks/loss_engine.py --quick    # smaller vocabulary, a minute, for a smoke test

Student hidden 896 (Qwen2.5-0.5B), teacher hidden 2048 (Qwen2.5-3B), vocabulary 151,936, forward KL at T=1,
fp32. Implementations, each in its own process so peak memory is honest; at the main size each runs in
`--rounds` processes (alternating order, so drifting load from other jobs hits all alike) and its fastest is
kept; the sweep over N runs once:
  naive     full logits, softmax / log_softmax, F.kl_div: what MiniMind and most tutorials write
  trl       TRL's ChunkedDivergenceFunction (forward KL, beta=0), when trl is installed
  lmdistill lmdistill.losses.fused_distillation_loss (chunk size from its default memory budget)
Peak memory is reported above the inputs and the student weight's gradient (which every method must hold): the
kernel's RSS high-water mark is reset once the inputs exist, so the peak covers the step alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memory import peak_mb, reset_peak, rss_mb  # benchmarks/memory.py

HS, HT, VOCAB = 896, 2048, 151_936
THREADS = None  # set from --threads for the worker processes


def make_inputs(n: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, HS, generator=g)
    ws = torch.randn(vocab, HS, generator=g).mul_(0.05)  # in place: no transient copy to inflate the peak
    ht = torch.randn(n, HT, generator=g)
    wt = torch.randn(vocab, HT, generator=g).mul_(0.05)
    return [x.to(device) for x in (hs, ws, ht, wt)]


def naive(hs, ws, ht, wt):
    with torch.no_grad():
        teacher_probs = F.softmax(ht @ wt.T, dim=-1)
    student_log_probs = F.log_softmax(hs @ ws.T, dim=-1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean")


def trl(hs, ws, ht, wt):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    per_token, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, 0.0, 1.0)
    return per_token.sum() / hs.shape[0]


def lmdistill(hs, ws, ht, wt):
    from lmdistill.losses import fused_distillation_loss

    labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)  # every position trained
    return fused_distillation_loss(hs, ws, ht, wt, labels, divergence="forward_kl")


IMPLS = {"naive": naive, "trl": trl, "lmdistill": lmdistill}


def worker(impl: str, n: int, vocab: int, device: str, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    hs, ws, ht, wt = make_inputs(n, vocab, device)
    ws.requires_grad_(True)
    hs.requires_grad_(True)
    fn = IMPLS[impl]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak()
        base = rss_mb()
    times, loss = [], None
    for i in range(warmup + repeats):
        ws.grad = hs.grad = None
        t0 = time.perf_counter()
        loss = fn(hs, ws, ht, wt)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mb()
    grad_mb = ws.numel() * ws.element_size() / 2**20
    return {"impl": impl, "n": n, "vocab": vocab, "device": device, "seconds": min(times), "all_seconds": times,
            "loss": loss.item(), "base_mb": base, "peak_mb": peak, "weight_grad_mb": grad_mb,
            "above_inputs_mb": peak - base - grad_mb}


def run_in_process(impl, n, vocab, device, repeats, warmup) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--vocab", str(vocab), "--device", device,
           "--repeats", str(repeats), "--warmup", str(warmup)] + (["--threads", str(THREADS)] if THREADS else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  {impl} N={n}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {impl:9s} N={n:5d}  {result['seconds']:7.2f} s  peak {result['peak_mb']:8.0f} MiB  "
          f"above inputs+grad {result['above_inputs_mb']:7.0f} MiB  loss {result['loss']:.6f}", flush=True)
    return result


def _have_trl() -> bool:
    try:
        import trl.kernels.chunked_divergence  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(IMPLS))
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2,
                   help="processes per implementation at the main size, in alternating order; the best is kept")
    p.add_argument("--quick", action="store_true", help="vocabulary 32,768 and a short sweep")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: all cores; use 1 when another job holds a core)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.vocab, a.device, a.repeats, a.warmup)))
        return
    global THREADS
    THREADS = a.threads
    vocab = 32_768 if a.quick else a.vocab
    impls = ["naive", "lmdistill"] + (["trl"] if _have_trl() else [])
    print(f"loss engine benchmark on {a.device}: N={a.n}, student H={HS}, teacher H={HT}, V={vocab}, fp32")
    rounds = {impl: [] for impl in impls}
    for k in range(a.rounds):  # alternate the order so drifting machine load hits every implementation alike
        for impl in (impls if k % 2 == 0 else impls[::-1]):
            if (r := run_in_process(impl, a.n, vocab, a.device, a.repeats, a.warmup)):
                rounds[impl].append(r)
    main_runs = [_best_of(rs) for rs in rounds.values() if rs]
    sweep_ns = [256, 512] if a.quick else [512, 2048, 4096]
    print("memory as N grows (one step each):")
    sweep = []
    for n in sweep_ns:
        for impl in ["lmdistill"] + (["naive"] if n <= 2048 else []):  # naive at 4096 needs ~20 GB
            if (r := run_in_process(impl, n, vocab, a.device, 1, 0)):
                sweep.append(r)
    by = {r["impl"]: r for r in main_runs}
    summary = _summary(by)
    _print_table(main_runs, sweep, summary)
    out = Path(a.out or Path(__file__).parent / "results" / f"loss_engine_{a.device.split(':')[0]}{'_quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
               "load_average": list(__import__("os").getloadavg()),
               "torch": torch.__version__, "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"}
    out.write_text(json.dumps({"machine": machine, "runs": main_runs, "sweep": sweep, "summary": summary}, indent=2))
    print(f"saved {out}")


def _best_of(results: list[dict]) -> dict:
    """The fastest process of an implementation, with every process's times kept for the record."""
    best = dict(min(results, key=lambda r: r["seconds"]))
    best["seconds_per_round"] = [r["seconds"] for r in results]
    return best


def _summary(by: dict) -> dict:
    ours, nv, tr = by.get("lmdistill"), by.get("naive"), by.get("trl")
    s = {}
    if ours and nv:
        s["time_vs_naive"] = ours["seconds"] / nv["seconds"]
        s["memory_above_inputs_vs_naive"] = ours["above_inputs_mb"] / nv["above_inputs_mb"]
        s["loss_rel_diff_vs_naive"] = abs(ours["loss"] - nv["loss"]) / abs(nv["loss"])
    if ours and tr:
        s["time_vs_trl"] = ours["seconds"] / tr["seconds"]
        s["memory_above_inputs_vs_trl"] = ours["above_inputs_mb"] / tr["above_inputs_mb"]
    targets = {"time_vs_naive": 0.9, "time_vs_trl": 0.4, "memory_above_inputs_vs_naive": 0.15,
               "loss_rel_diff_vs_naive": 1e-5}
    s["targets_met"] = {k: s[k] <= v for k, v in targets.items() if k in s}
    return s


def _print_table(runs, sweep, summary) -> None:
    print("\n| implementation | N | s / step | peak MiB | MiB above inputs + weight grad | loss |")
    print("|---|---|---|---|---|---|")
    for r in runs + sweep:
        print(f"| {r['impl']} | {r['n']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {r['above_inputs_mb']:.0f} | "
              f"{r['loss']:.6f} |")
    print()
    for k, v in summary.items():
        if k != "targets_met":
            print(f"{k}: {v:.3g}   target met: {summary['targets_met'].get(k)}")


if __name__ == "__main__":
    main()
