"""`report.md`: a summary table of the runs, the plots embedded by relative path, and each run's key options.

The markdown stays readable as plain text (it is what `lmdistill report` prints) and renders on GitHub with
the PNGs next to it, so a run folder can be committed or shared as is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from lmdistill.report.plots import plot_runs
from lmdistill.report.runs import Metrics, eval_metric_names, format_value, health_notes, summarize, term_names

EVAL_COLUMNS = {"ce": "eval CE", "ppl": "ppl", "bits_per_byte": "bits/byte", "kl_to_teacher": "KL to teacher",
                "agreement": "agreement", "teacher_ce": "teacher CE"}
# (header, config keys tried in order): `train` runs have `model`, `distill` runs `student` and `teacher`.
CONFIG_COLUMNS = (("command", ("command",)), ("teacher", ("teacher",)), ("student / model", ("student", "model")),
                  ("divergence", ("divergence",)), ("alpha", ("alpha",)), ("temperature", ("temperature",)))
PLOT_TITLES = {"loss": "Loss (solid: total, dashed: CE part, dotted: KD part; a part equal to the total is not drawn)",
               "lr": "Learning rate",
               "throughput": "Throughput", "eval": "Evaluation"}


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)  # e.g. several teachers
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(runs: dict[str, Metrics]) -> str:
    """Per run: last train step, final loss/CE/KD, mean tokens/s, and the metrics of its last evaluation."""
    evals = eval_metric_names(runs)
    terms = term_names(runs)
    header = ["run", "steps", "final loss", *(f"final {t.upper() if len(t) <= 3 else t}" for t in terms),
              "mean tokens/s"]
    header += [EVAL_COLUMNS.get(k, k) for k in evals]
    rows = []
    for label, m in runs.items():
        s = summarize(m)
        keys = ("steps", "loss", *(f"{t}_loss" for t in terms), "tokens_per_sec")
        row = [label] + [format_value(s.get(k)) for k in keys]
        rows.append(row + [format_value(s["eval"].get(k)) for k in evals])
    return _table(header, rows)


def config_table(runs: dict[str, Metrics]) -> str:
    """Per run: the options that tell runs apart (command, models, divergence, alpha, temperature)."""
    rows = []
    for label, m in runs.items():
        config = m.get("config") or {}
        values = [next((config[k] for k in keys if config.get(k) is not None), None) for _, keys in CONFIG_COLUMNS]
        rows.append([label] + ["—" if v is None else v for v in values])
    return _table(["run"] + [h for h, _ in CONFIG_COLUMNS], rows)


def write_report(runs: dict[str, Metrics], out_dir: str | Path, title: str = "lmdistill report",
                 colours: dict[str, str] | None = None) -> Path:
    """Write the plots and `report.md` into `out_dir`; returns the path of `report.md`. `colours` fixes a run's
    colour by its label (default: by position)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plot_runs(runs, out_dir, colours)
    parts = [
        f"# {title}", "",
        "## Summary", "", summary_table(runs), "",
        "Final values are from the last logged train step; tokens/s is the mean over logged steps; "
        "eval columns are from each run's last evaluation. KD is `—` for cross-entropy-only runs; a distill "
        "run's loss mixes CE and KD, so compare runs on CE.", "",
    ]
    health = [f"- {label}: {note}" for label, m in runs.items() for note in health_notes(m)]
    if health:
        parts += ["## Training health", "", *health, ""]
        if any(e["type"] == "final" for m in runs.values() for e in m.get("events", [])):
            parts += ["Under --keep_best the exported model is the best evaluation's; the summary's eval columns are "
                      "the last evaluation's.", ""]
    if images:
        parts += ["## Plots", ""]
        for image in images:
            rel = Path(os.path.relpath(image, out_dir)).as_posix()
            parts += [f"### {PLOT_TITLES.get(image.stem, image.stem)}", "", f"![{image.stem}]({rel})", ""]
    parts += ["## Configuration", "", config_table(runs), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
