"""Loss-engine benchmark: one forward + backward of the KD loss to the student, at Qwen2.5 sizes (and on a GPU at
Liger-Kernel's benchmark shape), on the first and on a later micro-batch of gradient accumulation.

    python benchmarks/loss_engine.py            # CPU, ~19 min on 2 cores (6 the later case) -> results/loss_engine_cpu.json
    python benchmarks/loss_engine.py --quick    # smaller vocabulary, a few minutes, for a smoke test
    python benchmarks/loss_engine.py --cases first          # only the first micro-batch (the CPU run of old)
    python benchmarks/loss_engine.py --device cuda          # bf16, both shapes -> results/loss_engine_cuda.json

Shapes (`--shapes`; default `qwen` on CPU, `qwen,liger` on CUDA):
  qwen   N=1024 tokens, student hidden 896 (Qwen2.5-0.5B), teacher hidden 2048 (Qwen2.5-3B), vocabulary 151,936
  liger  N=8192 tokens, student and teacher hidden 4096, vocabulary 128,256: Liger-Kernel's fused-linear-JSD
         benchmark (BT=8192, H=4096, V=128256, bf16); too large for a CPU
Forward KL at T=1, every position trained; fp32 on CPU, bf16 on CUDA (`--dtype`). Cases (`--cases`):
  first  the student weight has no .grad yet (`ws.grad = None` before each repeat): the first micro-batch
  later  ws.grad already exists (zeros, created before the memory baseline and counted with the inputs), as on every
         later micro-batch: autograd adds the new gradient into it. lmdistill then gets `loss_scale=1.0`, which adds
         its weight gradient straight into the existing .grad in the forward (passed only when
         `fused_distillation_loss` accepts it; `loss_scale_used` in the results says whether it did)
Implementations, each in its own process so peak memory is honest; at each shape and case each runs in `--rounds`
processes (alternating order, so drifting load from other jobs hits all alike) and its fastest is kept; the sweep
over N (qwen shape, first case) runs once:
  naive          full logits in the inputs' dtype, softmax / log_softmax in fp32, F.kl_div: what MiniMind and most
                 tutorials write (the fp32 upcast is a no-op in fp32)
  trl            TRL's ChunkedDivergenceFunction (forward KL, beta=0), when trl is installed
  lmdistill      lmdistill.losses.fused_distillation_loss (chunk size from its default memory budget)
  liger          (CUDA, when liger-kernel is installed) liger_kernel.transformers.LigerFusedLinearJSD(jsd_beta=0):
                 Liger's generalized JSD is beta KL(p||m) + (1-beta) KL(q||m) with p the teacher, q the student,
                 m = beta p + (1-beta) q, and beta=0 is special-cased to forward KL sum p (log p - log q)
                 (liger_kernel/ops/jsd.py); mean over non-ignored tokens, as ours
  liger_chunked  (CUDA, only with --impls) liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0,
                 weight_hard_loss=0, weight_soft_loss=1): its torch.compile'd chunked loss (beta=0 is
                 F.kl_div(log q, log p, log_target=True) = forward KL), the one TRL's trainers use with liger
  reference      (bf16 only; not timed) the loss in fp32 from the same inputs upcast, 1,024 tokens at a time: what
                 "loss equal" is measured against when the implementations round differently
Time: wall clock on CPU, CUDA events on a GPU (fastest repeat after warmup). Memory is reported above the inputs and
the student weight's gradient (which every method must hold): on CPU the RSS high-water mark, on CUDA
torch.cuda.max_memory_allocated, each reset once the inputs (and, in the later case, the existing .grad) exist, so
the peak covers the step alone.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from device import Clock, Memory, add_device_options, is_cuda, machine_record, resolve, results_path

SHAPES = {  # name -> (student hidden, teacher hidden, vocabulary, tokens)
    "qwen": (896, 2048, 151_936, 1024),
    "liger": (4096, 4096, 128_256, 8192),
}
CASES = ("first", "later")
THREADS = None  # set from --threads for the worker processes


def make_inputs(n: int, vocab: int, hs_dim: int, ht_dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    """hs [n, hs_dim], ws [vocab, hs_dim], ht [n, ht_dim], wt [vocab, ht_dim]. On CPU drawn in fp32 (the values of
    every earlier CPU run); on CUDA drawn on the GPU in `dtype` (a CPU draw of 2 x 0.5 G numbers takes longer
    than the whole GPU measurement)."""
    cuda = is_cuda(device)
    g = torch.Generator(device=device if cuda else "cpu").manual_seed(seed)
    kw = dict(generator=g, device=device, dtype=dtype) if cuda else dict(generator=g)
    hs = torch.randn(n, hs_dim, **kw)
    ws = torch.randn(vocab, hs_dim, **kw).mul_(0.05)  # in place: no transient copy to inflate the peak
    ht = torch.randn(n, ht_dim, **kw)
    wt = torch.randn(vocab, ht_dim, **kw).mul_(0.05)
    return [x.to(device=device, dtype=dtype) for x in (hs, ws, ht, wt)]


def naive(hs, ws, ht, wt, labels, case):
    with torch.no_grad():
        teacher_probs = F.softmax((ht @ wt.T).float(), dim=-1)
    student_log_probs = F.log_softmax((hs @ ws.T).float(), dim=-1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean")


def trl(hs, ws, ht, wt, labels, case):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    per_token, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, 0.0, 1.0)
    return per_token.float().sum() / hs.shape[0]


def lmdistill(hs, ws, ht, wt, labels, case):
    from lmdistill.losses import fused_distillation_loss

    extra = {"loss_scale": 1.0} if case == "later" and accepts_loss_scale() else {}
    return fused_distillation_loss(hs, ws, ht, wt, labels, divergence="forward_kl", **extra)


def liger(hs, ws, ht, wt, labels, case):
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=1.0)(hs, ws, ht, wt, labels)


def liger_chunked(hs, ws, ht, wt, labels, case):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, ignore_index=-100,
                                   temperature=1.0)
    return loss(hs, ws, ht, wt, labels)


IMPLS = {"naive": naive, "trl": trl, "lmdistill": lmdistill, "liger": liger, "liger_chunked": liger_chunked}


def accepts_loss_scale() -> bool:
    """Whether lmdistill's fused loss takes `loss_scale` (named by the public function or by the `_parts` function its
    **kwargs go to)."""
    from lmdistill.losses import functional

    fns = [getattr(functional, n, None) for n in ("fused_distillation_loss", "fused_distillation_loss_parts")]
    return any(f is not None and "loss_scale" in inspect.signature(f).parameters for f in fns)


def reference_loss(hs, ws, ht, wt, chunk: int = 1024) -> float:
    """Forward KL in fp32 from the inputs upcast (exact products of bf16 numbers), a token chunk at a time."""
    total = torch.zeros((), dtype=torch.float64, device=hs.device)
    ws32, wt32 = ws.float(), wt.float()
    for i in range(0, hs.shape[0], chunk):
        zs, zt = hs[i:i + chunk].float() @ ws32.T, ht[i:i + chunk].float() @ wt32.T
        log_p, log_q = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        total += (log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64)
    return (total / hs.shape[0]).item()


def worker(impl: str, shape: str, case: str, n: int, vocab: int, device: str, dtype: str, repeats: int,
           warmup: int) -> dict:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls stay fp32 (the default; stated, not assumed)
    hs_dim, ht_dim = SHAPES[shape][:2]
    hs, ws, ht, wt = make_inputs(n, vocab, hs_dim, ht_dim, device, getattr(torch, dtype))
    record = {"impl": impl, "shape": shape, "case": case, "n": n, "vocab": vocab, "student_hidden": hs_dim,
              "teacher_hidden": ht_dim, "device": device, "dtype": dtype}
    if impl == "reference":
        return {**record, "loss": reference_loss(hs, ws, ht, wt)}
    labels = torch.zeros(n, dtype=torch.long, device=device)  # every position trained
    ws.requires_grad_(True)
    hs.requires_grad_(True)
    if case == "later":
        ws.grad = torch.zeros_like(ws)  # an earlier micro-batch's gradient, held before the step like the inputs
    fn, clock, memory = IMPLS[impl], Clock(device), Memory(device)
    base, _ = memory.reset()
    times, loss = [], None
    for i in range(warmup + repeats):
        hs.grad = None
        if case == "first":
            ws.grad = None
        clock.start()
        loss = fn(hs, ws, ht, wt, labels, case)
        loss.backward()
        seconds = clock.stop()
        if i >= warmup:
            times.append(seconds)
    peak = memory.peak()
    grad_mb = ws.numel() * ws.element_size() / 2**20
    steps_in_grad = warmup + repeats if case == "later" else 1
    grad_norm = torch.linalg.vector_norm(ws.grad, dtype=torch.float32).item() / steps_in_grad
    return {**record, "seconds": min(times), "all_seconds": times, "loss": loss.item(), "base_mb": base,
            "peak_mb": peak, "weight_grad_mb": grad_mb,
            "above_inputs_mb": peak - base - (grad_mb if case == "first" else 0.0),
            "weight_grad_norm_per_step": grad_norm,
            "loss_scale_used": impl == "lmdistill" and case == "later" and accepts_loss_scale()}


def run_in_process(impl, shape, case, n, vocab, device, dtype, repeats, warmup) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", impl, "--shape", shape, "--case", case, "--n", str(n), "--vocab",
           str(vocab), "--device", device, "--dtype", dtype, "--repeats", str(repeats), "--warmup", str(warmup)]
    cmd += ["--threads", str(THREADS)] if THREADS else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  {impl} {shape} {case} N={n}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if impl == "reference":
        print(f"  reference {shape:5s} N={n:5d}  fp32 loss {r['loss']:.6f}", flush=True)
        return r
    print(f"  {impl:13s} {shape:5s} {case:5s} N={n:5d}  {r['seconds']:8.3f} s  peak {r['peak_mb']:8.0f} MiB  "
          f"above inputs+grad {r['above_inputs_mb']:7.0f} MiB  loss {r['loss']:.6f}", flush=True)
    return r


def available_impls(device: str) -> list[str]:
    impls = ["naive", "lmdistill"]
    if _importable("trl.kernels.chunked_divergence"):
        impls.append("trl")
    if is_cuda(device) and _importable("liger_kernel.transformers"):
        impls.append("liger")
    return impls


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(IMPLS) + ["reference"])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen")
    p.add_argument("--case", choices=CASES, default="first")
    p.add_argument("--n", type=int, default=None, help="tokens (default: the shape's; with --shapes, for every shape)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the shape's; --quick: 32,768)")
    add_device_options(p, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None,
                   help="comma-separated from qwen, liger (default: qwen on CPU, both on CUDA)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated from first, later")
    p.add_argument("--impls", default=None, help=f"comma-separated from {', '.join(IMPLS)} (default: those installed "
                   "for the device; liger_chunked only when named)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2,
                   help="processes per implementation at each shape and case, in alternating order; the best is kept")
    p.add_argument("--no_sweep", action="store_true", help="skip the memory-vs-N sweep")
    p.add_argument("--quick", action="store_true", help="vocabulary 32,768 and a short sweep")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: all cores; use 1 when another job holds a core)")
    a = p.parse_args()
    dtype = resolve(p, a.device, a.dtype)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        shape = SHAPES[a.shape]
        print(json.dumps(worker(a.worker, a.shape, a.case, a.n or shape[3], a.vocab or shape[2], a.device, dtype,
                                a.repeats, a.warmup)))
        return
    global THREADS
    THREADS = a.threads
    shapes = (a.shapes or ("qwen,liger" if is_cuda(a.device) else "qwen")).split(",")
    cases = a.cases.split(",")
    impls = a.impls.split(",") if a.impls else available_impls(a.device)
    if set(shapes) - set(SHAPES) or set(cases) - set(CASES) or set(impls) - set(IMPLS):
        p.error(f"--shapes takes {', '.join(SHAPES)}; --cases {', '.join(CASES)}; --impls {', '.join(IMPLS)}; found "
                f"{','.join(shapes)} / {','.join(cases)} / {','.join(impls)}")
    out = results_path("loss_engine", a.device, a.quick, a.out)
    record = {"machine": {**machine_record(a.device, dtype), "threads": torch.get_num_threads(),
                         "load_average": list(os.getloadavg())},
              "command": " ".join(sys.argv), "runs": [], "reference": [], "sweep": [], "summary": {}}
    for shape in shapes:
        hs_dim, ht_dim, shape_vocab, shape_n = SHAPES[shape]
        n, vocab = a.n or shape_n, 32_768 if a.quick else (a.vocab or shape_vocab)
        print(f"loss engine benchmark on {a.device} ({dtype}), shape {shape}: N={n}, student H={hs_dim}, "
              f"teacher H={ht_dim}, V={vocab}; implementations {', '.join(impls)}")
        ref = None if dtype == "float32" else run_in_process("reference", shape, "first", n, vocab, a.device, dtype,
                                                             0, 0)
        record["reference"] += [ref] if ref else []
        record["summary"][shape] = {}
        for case in cases:
            rounds = {impl: [] for impl in impls}
            for k in range(a.rounds):  # alternate the order so drifting machine load hits every implementation alike
                for impl in (impls if k % 2 == 0 else impls[::-1]):
                    if (r := run_in_process(impl, shape, case, n, vocab, a.device, dtype, a.repeats, a.warmup)):
                        rounds[impl].append(r)
            runs = [_best_of(rs) for rs in rounds.values() if rs]
            record["runs"] += runs
            record["summary"][shape][case] = _summary({r["impl"]: r for r in runs}, ref and ref["loss"], dtype)
        if shape == "qwen" and not a.no_sweep:
            record["sweep"] = _sweep(vocab, a.device, dtype, a.quick)
        _write(out, record)  # after every shape: a run cut short by a timeout keeps what it finished
    _print_table(record["runs"], record["sweep"], record["summary"])
    print(f"saved {out}")


def _sweep(vocab: int, device: str, dtype: str, quick: bool) -> list[dict]:
    print("memory as N grows (one step each, first case):")
    sweep = []
    for n in [256, 512] if quick else [512, 2048, 4096]:
        for impl in ["lmdistill"] + (["naive"] if n <= 2048 else []):  # naive at 4096 needs ~20 GB of CPU memory
            if (r := run_in_process(impl, "qwen", "first", n, vocab, device, dtype, 1, 0)):
                sweep.append(r)
    return sweep


def _write(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


def _best_of(results: list[dict]) -> dict:
    """The fastest process of an implementation, with every process's times kept for the record."""
    best = dict(min(results, key=lambda r: r["seconds"]))
    best["seconds_per_round"] = [r["seconds"] for r in results]
    return best


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _summary(by: dict, reference: float | None, dtype: str) -> dict:
    """Ours against each other implementation: time, memory above the inputs, loss and weight-gradient norm (relative
    differences); in bf16 also the loss against the fp32 reference. Targets: time <= 0.7x naive and <= 0.35x TRL,
    memory above inputs <= 0.15x naive, time and memory <= 1.0x Liger's, the loss equal (fp32: 1e-5 relative to naive;
    bf16: 1e-4 relative to the fp32 reference and to Liger, whose logits are fp32 products of the same bf16 numbers)."""
    ours, s = by.get("lmdistill"), {}
    if not ours:
        return s
    loss_tol = 1e-5 if dtype == "float32" else 1e-4
    grad_tol = 1e-4 if dtype == "float32" else 1e-2
    targets = {"time_vs_naive": 0.7, "time_vs_trl": 0.35, "memory_above_inputs_vs_naive": 0.15,
               "time_vs_liger": 1.0, "memory_above_inputs_vs_liger": 1.0, "loss_rel_diff_vs_liger": loss_tol,
               "grad_norm_rel_diff_vs_naive": grad_tol}
    for name, other in by.items():
        if name == "lmdistill":
            continue
        s[f"time_vs_{name}"] = ours["seconds"] / other["seconds"]
        s[f"memory_above_inputs_vs_{name}"] = ours["above_inputs_mb"] / max(other["above_inputs_mb"], 1e-9)
        s[f"peak_memory_vs_{name}"] = ours["peak_mb"] / other["peak_mb"]
        s[f"loss_rel_diff_vs_{name}"] = _rel(ours["loss"], other["loss"])
        s[f"grad_norm_rel_diff_vs_{name}"] = _rel(ours["weight_grad_norm_per_step"], other["weight_grad_norm_per_step"])
    if reference is not None:
        for name, r in by.items():
            s[f"loss_rel_diff_vs_reference_{name}"] = _rel(r["loss"], reference)
        targets["loss_rel_diff_vs_reference_lmdistill"] = loss_tol
    else:
        targets["loss_rel_diff_vs_naive"] = loss_tol
    s["loss_scale_used"] = ours["loss_scale_used"]
    s["targets"] = {k: v for k, v in targets.items() if k in s}
    s["targets_met"] = {k: s[k] <= v for k, v in s["targets"].items()}
    return s


def _print_table(runs, sweep, summary) -> None:
    print("\n| implementation | shape | case | N | s / step | peak MiB | MiB above inputs + weight grad | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs + sweep:
        print(f"| {r['impl']} | {r['shape']} | {r['case']} | {r['n']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | "
              f"{r['above_inputs_mb']:.0f} | {r['loss']:.6f} |")
    for shape, by_case in summary.items():
        for case, s in by_case.items():
            print(f"\n{shape}, {case} micro-batch" + (" (lmdistill with loss_scale=1.0)" if s.get("loss_scale_used")
                                                      else ""))
            for k, v in s.items():
                if isinstance(v, float):
                    met = s["targets_met"].get(k)
                    print(f"  {k}: {v:.3g}" + ("" if met is None else f"   target <= {s['targets'][k]:g}: "
                                               f"{'met' if met else 'NOT met'}"))


if __name__ == "__main__":
    main()
