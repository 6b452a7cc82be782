"""Where a benchmark runs: its --device/--dtype options, a step clock and a memory meter for CPU and CUDA, the machine
record and the results path, so every benchmark measures the same way on both.

CPU: wall time (time.perf_counter) and the process's RSS high-water mark (memory.py), as the CPU results always were.
CUDA: CUDA events around the step (GPU time, the host waits at the end event), and peak allocated memory:
torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats(), i.e. live tensors, not the caching
allocator's reserve. On CUDA the default dtype is bfloat16, and results go to results/<name>_cuda.json.
Data (tinyshakespeare, the MiniMind tokenizer, alpaca_en_demo) is read from ../shared/data beside the project, or from
the folder named by $LMDISTILL_BENCH_DATA (benchmarks/gpu_suite.sh points it at .gpu_data/ on a machine without it).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from memory import peak_mb, reset_peak, rss_mb  # benchmarks/memory.py

RESULTS = Path(__file__).parent / "results"
DATA_DIR = Path(os.environ.get("LMDISTILL_BENCH_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
DTYPES = ("float32", "bfloat16")


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def add_device_options(p, default: str = "cpu") -> None:
    p.add_argument("--device", default=default, help=f"cpu or cuda[:N] (default: {default})")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")


def resolve(p, device: str, dtype: str | None) -> str:
    """The dtype for `device` (bfloat16 on CUDA unless given); a usage error when CUDA is asked for but absent."""
    if is_cuda(device) and not torch.cuda.is_available():
        p.error(f"--device {device}: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is "
                "False); use --device cpu or run on the GPU machine.")
    return dtype or ("bfloat16" if is_cuda(device) else "float32")


class Clock:
    """start()/stop() -> seconds: CUDA events on a GPU (kernel time of everything queued in between), wall time on
    CPU."""

    def __init__(self, device: str):
        self.cuda = is_cuda(device)

    def start(self) -> None:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.t0.elapsed_time(end) / 1e3


class Memory:
    """reset() -> (MiB now, whether the high-water mark could be reset); peak() -> MiB high-water mark since.
    CUDA: allocated tensor memory; CPU: the process's RSS."""

    def __init__(self, device: str):
        self.cuda = is_cuda(device)

    def now(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else rss_mb()

    def reset(self) -> tuple[float, bool]:
        if not self.cuda:
            ok = reset_peak()
            return rss_mb(), ok
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self.now(), True

    def peak(self) -> float:
        if not self.cuda:
            return peak_mb()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def results_path(name: str, device: str, quick: bool = False, out: str | None = None) -> Path:
    """results/<name>_<cpu|cuda>[_quick].json unless --out names a file."""
    kind = "cuda" if is_cuda(device) else "cpu"
    return Path(out) if out else RESULTS / f"{name}_{kind}{'_quick' if quick else ''}.json"


def machine_record(device: str, dtype: str) -> dict:
    """What ran it: the platform, the CPU, torch, and on CUDA the GPU's name and the CUDA version."""
    record = {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "device": device, "dtype": dtype,
              "device_name": torch.cuda.get_device_name(torch.device(device)) if is_cuda(device) else "cpu"}
    if is_cuda(device):
        record.update(cuda=torch.version.cuda, memory_measure="torch.cuda.max_memory_allocated after "
                      "reset_peak_memory_stats (MiB of live tensors)", time_measure="CUDA events")
    return record


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()
