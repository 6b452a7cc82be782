"""`lmdistill report`: loss curves, learning rate, throughput and eval metrics of one or more runs, overlaid,
as PNGs and a markdown summary.

    lmdistill report runs/ce runs/kd --output_dir runs/compare
    lmdistill report runs/kd_fwd runs/kd_rev --labels forward,reverse

From Python (the quickstart does this):

    from lmdistill.report import read_metrics, write_report
    runs = {"ce": read_metrics("runs/ce"), "kd": read_metrics("runs/kd")}
    write_report(runs, "runs/compare")          # report.md + loss.png, lr.png, throughput.png, eval.png

Modules: `runs` reads `metrics.jsonl` and summarizes it, `plots` draws, `markdown` writes `report.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmdistill.report.markdown import summary_table, write_report
from lmdistill.report.plots import plot_bars, plot_eval, plot_loss_curves, plot_runs, plot_train_metric
from lmdistill.report.runs import load_runs, metrics_path, read_metrics, summarize

__all__ = [
    "read_metrics", "load_runs", "summarize", "plot_runs", "plot_loss_curves", "plot_train_metric", "plot_eval",
    "plot_bars", "write_report", "summary_table", "add_arguments", "run",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories with metrics.jsonl (written by `lmdistill train` / `distill`)")
    parser.add_argument("--output_dir", "--out_dir", dest="output_dir", default=None,
                        help="where report.md and the PNGs go (default: the first run directory)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated run labels, one per RUN_DIR (default: the directories' names)")
    parser.add_argument("--title", default="lmdistill report", help="the report's heading")


def with_stages(run_dirs: list[str], labels: list[str] | None) -> tuple[list[str], list[str] | None]:
    """A progressive run's folder (`--via`) stands for its stages (`stage-N-NAME/`, in order) and its final run."""
    dirs, names, any_stages = [], [], False
    for i, d in enumerate(run_dirs):
        path = Path(d)
        stages = [s for s in path.glob("stage-*") if (s / "metrics.jsonl").is_file()] if path.is_dir() else []
        stages.sort(key=lambda s: int(s.name.split("-")[1]) if s.name.split("-")[1].isdigit() else 0)
        dirs += [str(s) for s in stages] + [d]
        name = labels[i] if labels else path.name
        names += [s.name for s in stages] + [f"{name} (final)" if stages else name]
        any_stages = any_stages or bool(stages)
    return (dirs, names) if any_stages else (list(run_dirs), labels)


def run(args: argparse.Namespace) -> int:
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        from lmdistill.errors import LmdistillError

        raise LmdistillError(f"--labels: expected {len(args.run_dirs)} labels (one per RUN_DIR), found {len(labels)}.")
    run_dirs, labels = with_stages(args.run_dirs, labels)
    runs = load_runs(run_dirs, labels)
    out_dir = Path(args.output_dir) if args.output_dir else metrics_path(args.run_dirs[0]).parent
    path = write_report(runs, out_dir, title=args.title)
    print(summary_table(runs))
    print(f"\nwrote {path} and its plots")
    return 0
