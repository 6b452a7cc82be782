"""Running lmdistill in other processes, for the tests that need a real process: the CLI in a subprocess (one
thread; kill and resume tests) and a worker under torchrun on two CPU ranks (DDP/FSDP tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def lmdistill(argv: list, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m lmdistill ARGV` with OMP_NUM_THREADS=1 plus `env`; output captured."""
    return subprocess.run([sys.executable, "-m", "lmdistill", *map(str, argv)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: str, out: Path, command: str, argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """tests/WORKER on 2 CPU ranks (`python -m torch.distributed.run`), saving what it saves to `out`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(TESTS / worker), str(out), command, *map(str, argv)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)},
                          capture_output=True, text=True, timeout=timeout)
