"""Reading run directories: the `metrics.jsonl` records the training loop writes (see
`lmdistill.train.metrics`), the resolved `lmdistill_config.yaml`, and the per-run numbers of the summary.

A run's metrics are a plain dict `{"train": [record, ...], "eval": [record, ...], "config": {...}}` so a
notebook can build one by hand; every function here and in the plots accepts that shape. `read_metrics` adds
`"events"`: the training-health records (`best`, `early_stop`, `final`, `health`; see `lmdistill.train.health`),
read with `m.get("events", [])`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from lmdistill.errors import LmdistillError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "lmdistill_config.yaml"
# Eval metrics in the order the evaluator defines them; other numeric fields follow alphabetically.
EVAL_ORDER = ("ce", "ppl", "bits_per_byte", "kl_to_teacher", "agreement")
_NOT_EVAL_METRICS = {"type", "step", "tokens"}
EVENT_TYPES = ("best", "early_stop", "final", "health")

Metrics = dict[str, Any]


def metrics_path(run_dir: str | Path) -> Path:
    """The `metrics.jsonl` of a run directory; a path to a `.jsonl` file itself is accepted too."""
    path = Path(run_dir)
    if path.is_file() and path.suffix == ".jsonl":
        return path
    if not path.exists():
        raise LmdistillError(f"run directory '{path}' does not exist.")
    if not path.is_dir():
        raise LmdistillError(f"expected a run directory (with {METRICS_FILE}), found a file: '{path}'.")
    if not (path / METRICS_FILE).is_file():
        raise LmdistillError(
            f"{path}: no {METRICS_FILE}; expected a run directory written by `lmdistill train` or `distill`."
        )
    return path / METRICS_FILE


def read_metrics(run_dir: str | Path) -> Metrics:
    """`{"train": [...], "eval": [...], "config": {...}}` from one run directory.

    Records of other types are skipped so that newer writers stay readable; a line that is not a JSON
    object with a `type` (and an integer `step` for train/eval) is an error naming file:line.
    """
    path = metrics_path(run_dir)
    found: dict[str, list[dict]] = {"train": [], "eval": [], "events": []}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = _parse_record(line, f"{path}:{lineno}")
                if record["type"] in found:
                    found[record["type"]].append(record)
                elif record["type"] in EVENT_TYPES:
                    found["events"].append(record)
    if not found["train"] and not found["eval"]:
        raise LmdistillError(f"{path}: no train or eval records (was the run stopped before its first log step?).")
    return {**found, "config": _read_config(path.parent / CONFIG_FILE)}


def _parse_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LmdistillError(
            f"{where}: expected one JSON object per line, found invalid JSON ({exc.msg}, column {exc.colno})."
        ) from None
    if not isinstance(record, dict):
        raise LmdistillError(f"{where}: expected a JSON object, found {type(record).__name__}.")
    kind = record.get("type")
    if not isinstance(kind, str):
        raise LmdistillError(f"{where}: expected a 'type' field ('train' or 'eval'), found {kind!r}.")
    step = record.get("step")
    if kind in ("train", "eval", *EVENT_TYPES) and (not isinstance(step, int) or isinstance(step, bool)):
        raise LmdistillError(f"{where}: expected an integer 'step' in a {kind} record, found {step!r}.")
    return record


def health_notes(metrics: Metrics) -> list[str]:
    """What a run's health records say, one sentence each: the step exported under --keep_best and why, early
    stopping, warnings, and a teacher worse than the student at the last evaluation."""
    notes, checks = [], set()
    for e in metrics.get("events", []):
        kind, text = e["type"], str(e.get("message", "")).rstrip(".")
        if kind == "final":
            notes.append(f"exported the model of step {e.get('exported_step')} ({text}).")
        elif kind == "early_stop":
            notes.append(f"{text}.")
        elif kind == "health":
            checks.add(e.get("check"))
            notes.append(f"warning at step {e['step']} ({e.get('check')}): {text}.")
    last = max(metrics["eval"], key=lambda r: r["step"], default={})
    teacher, student = last.get("teacher_ce"), last.get("ce")
    if "teacher_worse" not in checks and is_number(teacher) and is_number(student) and teacher > student:
        notes.append(f"the teacher is worse than the student on the held-out data (teacher CE {teacher:.4f} > student "
                     f"CE {student:.4f} at step {last['step']}): distilling from it will not help.")
    return notes


def _read_config(path: Path) -> dict:
    """The resolved options of the run; a run directory without them still reports its curves."""
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LmdistillError(f"{path}: invalid YAML: {exc}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise LmdistillError(f"{path}: expected a mapping of options, found {type(config).__name__}.")
    return config


def load_runs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> dict[str, Metrics]:
    """`{label: metrics}` for several run directories, labelled by directory name unless `labels` are given."""
    if not run_dirs:
        raise LmdistillError("expected at least one run directory.")
    files = [metrics_path(d) for d in run_dirs]
    dirs = [f.parent for f in files]
    if labels is None:
        names = [d.resolve().name for d in dirs]
        # Two runs called e.g. `out` in different folders keep their distinct paths as labels.
        labels = names if len(set(names)) == len(names) else [str(d) for d in dirs]
        if len(set(labels)) != len(labels):
            raise LmdistillError(f"expected distinct run directories, found one given twice in {list(labels)}.")
    if len(labels) != len(dirs):
        raise LmdistillError(f"--labels: expected {len(dirs)} labels (one per run directory), found {len(labels)}.")
    if len(set(labels)) != len(labels):
        raise LmdistillError(f"--labels: expected one distinct label per run, found {list(labels)}.")
    return {label: read_metrics(f) for label, f in zip(labels, files)}


def is_number(value: Any) -> bool:
    """A plottable value: an int or float that is not a bool; NaN counts (it shows as a gap)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over `records`, skipping records where it is null or absent."""
    points = [(r["step"], float(r[key])) for r in records if is_number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def eval_metric_names(runs: dict[str, Metrics]) -> list[str]:
    """Numeric eval fields present in any run, in the evaluator's order."""
    names = {k for m in runs.values() for r in m["eval"] for k, v in r.items()
             if k not in _NOT_EVAL_METRICS and is_number(v)}
    return [k for k in EVAL_ORDER if k in names] + sorted(names - set(EVAL_ORDER))


def term_names(runs: dict[str, Metrics] | Metrics) -> list[str]:
    """Named loss terms logged by any run (`kd_loss`, `ce_loss`, `aux_loss`, ... -> kd, ce, aux, ...), in the
    training log's order; whatever terms an objective has appear without edits here."""
    from lmdistill.train.metrics import loss_terms

    many = runs.values() if "train" not in runs else [runs]
    found = {t: 0.0 for m in many for r in m["train"] for t in loss_terms({k: v for k, v in r.items() if is_number(v)})}
    return loss_terms({f"{t}_loss": 0.0 for t in found})


def has_kd(metrics: Metrics) -> bool:
    """Whether the run logged a distillation term (CE-only runs log `kd_loss: null`)."""
    return any(is_number(r.get("kd_loss")) for r in metrics["train"])


def summarize(metrics: Metrics) -> dict[str, Any]:
    """The summary-table row of one run: the last logged train values, mean tokens/s, the last eval."""
    train = metrics["train"]
    last = lambda key: (series(train, key)[1] or [None])[-1]  # noqa: E731
    speeds = [v for v in series(train, "tokens_per_sec")[1] if math.isfinite(v)]
    last_eval = max(metrics["eval"], key=lambda r: r["step"], default={})
    return {
        "steps": max((r["step"] for r in train), default=None),
        "loss": last("loss"),
        **{f"{t}_loss": last(f"{t}_loss") for t in term_names(metrics)},
        "tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
        "eval": {k: float(v) for k, v in last_eval.items() if k not in _NOT_EVAL_METRICS and is_number(v)},
    }


def format_value(value: Any) -> str:
    """How the report prints a number: ints as is, floats with 4 decimals or thousands separators from
    1000 up (tokens/s, perplexity); '—' when absent."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}"
