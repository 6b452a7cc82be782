"""Does the quickstart's distilled student beat its CE student on held-out perplexity and exact match, on every
seed? Runs `lmdistill quickstart` once per seed (each in a fresh process, as a user would), then prints a table
of mean and spread and writes the raw results.

    python benchmarks/quickstart_seeds.py             # seeds 0 1 2 -> benchmarks/results/quickstart_seeds.json
    python benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4 --work_dir /tmp/qs_seeds

Wall times depend on what else runs on the machine: the load average before and after each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("teacher", "student_ce", "student_kd")
METRICS = ("ce", "ppl", "bits_per_byte", "accuracy", "kl_to_teacher")


def run_seed(seed: int, work_dir: Path) -> dict:
    out = work_dir / f"seed{seed}"
    cmd = [sys.executable, "-m", "lmdistill", "quickstart", "--seed", str(seed), "--output_dir", str(out)]
    load_before, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    return {"seed": seed, "command": " ".join(cmd[2:]), "wall_seconds": round(wall, 1),
            "load_before": load_before, "load_after": os.getloadavg()[0], "results": results}


def summarize(runs: list[dict]) -> dict:
    def stats(values: list[float]) -> dict:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    out = {m: {k: stats([r["results"][m][k] for r in runs]) for k in METRICS if k in runs[0]["results"][m]}
           for m in MODELS}
    ce, kd = ([r["results"][m] for r in runs] for m in ("student_ce", "student_kd"))
    out["margin"] = {"ce": stats([c["ce"] - k["ce"] for c, k in zip(ce, kd)]),
                     "ppl": stats([c["ppl"] - k["ppl"] for c, k in zip(ce, kd)]),
                     "accuracy": stats([k["accuracy"] - c["accuracy"] for c, k in zip(ce, kd)])}
    out["kd_wins_every_seed"] = all(k["ppl"] < c["ppl"] and k["accuracy"] > c["accuracy"] for c, k in zip(ce, kd))
    out["seconds"] = stats([r["results"]["seconds"] for r in runs])
    return out


def table(runs: list[dict], summary: dict) -> str:
    lines = [f"{'seed':>4} {'model':<11} {'CE':>6} {'ppl':>6} {'bits/B':>7} {'acc':>6} {'KL':>6} {'seconds':>8}"]
    for r in runs:
        for m in MODELS:
            x = r["results"][m]
            kl = f"{x['kl_to_teacher']:.3f}" if "kl_to_teacher" in x else "-"
            lines.append(f"{r['seed']:>4} {m:<11} {x['ce']:>6.3f} {x['ppl']:>6.2f} {x['bits_per_byte']:>7.3f} "
                         f"{x['accuracy']:>6.1%} {kl:>6} {r['results']['seconds'] if m == 'teacher' else '':>8}")
    lines.append("mean +- std over seeds:")
    for m in MODELS:
        s = summary[m]
        lines.append(f"  {m:<11} CE {s['ce']['mean']:.3f} +- {s['ce']['std']:.3f}  ppl {s['ppl']['mean']:.2f} +- "
                     f"{s['ppl']['std']:.2f}  acc {s['accuracy']['mean']:.1%} +- {s['accuracy']['std']:.1%}")
    g = summary["margin"]
    lines.append(f"  KD - CE: ppl -{g['ppl']['mean']:.2f} (min {g['ppl']['min']:.2f}), accuracy "
                 f"+{g['accuracy']['mean']:.1%} (min {g['accuracy']['min']:.1%}); KD better on every seed: "
                 f"{summary['kd_wins_every_seed']}")
    lines.append(f"  run time {summary['seconds']['mean']:.0f} s (min {summary['seconds']['min']:.0f}, max "
                 f"{summary['seconds']['max']:.0f})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work_dir", default="/tmp/lmdistill_quickstart_seeds")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "quickstart_seeds.json"))
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, Path(args.work_dir)))
        print(f"seed {seed}: {runs[-1]['wall_seconds']:.0f}s (load {runs[-1]['load_before']:.1f} -> "
              f"{runs[-1]['load_after']:.1f})", flush=True)
    summary = summarize(runs)
    print(table(runs, summary))
    import torch

    record = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "runs": runs, "summary": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
