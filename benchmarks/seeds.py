"""What the multi-seed benchmarks share (imported by the scripts beside it, as `memory.py` is): the JSON record
(command, machine, recipe), the loop over seeds that rewrites the JSON after every seed (a cut run keeps the seeds
it finished), and mean/std/min/max of a metric over seeds."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def new_record(script: str, options: str, recipe) -> dict:
    """The record's header: the command that reproduces it (with the thread setting it ran under), the machine,
    the recipe."""
    import torch

    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return {"command": f"{threads}python benchmarks/{script} {options}",
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "recipe": dataclasses.asdict(recipe), "runs": []}


def run_seeds(record: dict, seeds: list[int], run_seed: Callable[[int], dict],
              summarize: Callable[[list[dict]], dict], output: Path) -> dict:
    """`run_seed(seed)` for each seed, the summary and wall time updated and the JSON rewritten after each."""
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for seed in seeds:
        record["runs"].append(run_seed(seed))
        record["summary"] = summarize(record["runs"])
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"seed {seed} done in {record['runs'][-1]['seconds']:.0f}s", flush=True)
    return record


def seed_parser(doc: str, name: str):
    """The options every multi-seed benchmark takes: --seeds, --steps_scale, --work_dir, --device, --output
    (results/NAME.json)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps_scale", type=float, default=1.0, help="every step count times this (Recipe.scaled)")
    parser.add_argument("--work_dir", default=f"/tmp/lmdistill_{name}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / f"{name}.json"))
    return parser
