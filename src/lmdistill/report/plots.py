"""PNG plots of one or more runs, and grouped bars of held-out metrics of several models.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never through `pyplot`: no display is
needed, no global backend is switched under a user's notebook, and no figure outlives its function. Each run
keeps one colour (`C0`, `C1`, ... by its position in `runs`) across every plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lmdistill.errors import LmdistillError
from lmdistill.report.runs import Metrics, eval_metric_names, has_kd, is_number, series

# Pretty names and which way is better, for titles.
METRIC_LABELS = {
    "ce": "eval CE (nats/token) ↓", "ppl": "perplexity ↓", "bits_per_byte": "bits per byte ↓",
    "kl_to_teacher": "KL(teacher ‖ model) ↓", "agreement": "top-1 agreement with teacher ↑",
    "accuracy": "exact match ↑",
}
_STYLES = {"loss": ("-", "total"), "ce_loss": ("--", "CE part"), "kd_loss": (":", "KD part")}


def _figure(nrows: int = 1, ncols: int = 1, width: float = 7.5, height: float = 4.5):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _has(runs: dict[str, Metrics], kind: str, key: str) -> bool:
    return any(series(m[kind], key)[0] for m in runs.values())


def plot_loss_curves(runs: dict[str, Metrics], path: str | Path, title: str = "training loss") -> Path:
    """Total loss per run (solid) with its CE (dashed) and KD (dotted) parts for runs that distill.

    A CE-only run draws only its total: its CE part is the same curve. Colours name runs in one legend,
    line styles name the parts in a second one.
    """
    if not _has(runs, "train", "loss"):
        raise LmdistillError(f"{path}: no train records with a 'loss' to plot.")
    fig, axes = _figure()
    ax = axes[0, 0]
    any_kd = False
    for i, m in enumerate(runs.values()):
        parts = ("loss", "ce_loss", "kd_loss") if has_kd(m) else ("loss",)
        any_kd |= len(parts) > 1
        for key in parts:
            steps, values = series(m["train"], key)
            ax.plot(steps, values, _STYLES[key][0], color=_colour(i), lw=1.4 if key == "loss" else 1.1)
    fig.legend(_run_handles(runs), list(runs), title="run", loc="outside right upper")
    if any_kd:
        styles = [Line2D([], [], color="0.3", ls=ls) for ls, _ in _STYLES.values()]
        fig.legend(styles, [name for _, name in _STYLES.values()], title="part", loc="outside right lower")
    _decorate(ax, title, "loss")
    return _save(fig, path)


def _run_handles(runs: dict[str, Metrics]) -> list[Line2D]:
    return [Line2D([], [], color=_colour(i), lw=2) for i in range(len(runs))]


def _decorate(ax, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_train_metric(runs: dict[str, Metrics], key: str, path: str | Path, title: str, ylabel: str,
                      outline: bool = False) -> Path:
    """One non-negative train-record field (lr, tokens/s) against step, one line per run, y from 0.

    The legend sits outside the axes (constrained layout makes room) so it never hides a curve. With
    `outline`, earlier runs are drawn wider so identical curves (a shared lr schedule) stay visible.
    """
    fig, axes = _figure()
    ax = axes[0, 0]
    for i, m in enumerate(runs.values()):
        steps, values = series(m["train"], key)
        ax.plot(steps, values, color=_colour(i), lw=max(1.4, 3.4 - 1.0 * i) if outline else 1.4)
    fig.legend(_run_handles(runs), list(runs), title="run", loc="outside right upper")
    if key == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)
    _decorate(ax, title, ylabel)
    return _save(fig, path)


def plot_eval(runs: dict[str, Metrics], path: str | Path, title: str = "evaluation") -> Path:
    """Eval metrics against step, one subplot per metric any run logged; markers show each evaluation."""
    names = eval_metric_names(runs)
    if not names:
        raise LmdistillError(f"{path}: no eval records with numeric metrics to plot.")
    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.2 * ncols, height=3.4 * nrows + 0.6)
    for ax, name in zip(axes.flat, names):
        for i, m in enumerate(runs.values()):
            steps, values = series(m["eval"], name)
            ax.plot(steps, values, "o-", color=_colour(i), lw=1.2, ms=4)
        _decorate(ax, METRIC_LABELS.get(name, name), "")
        if ax is not axes[0, 0]:
            ax.sharex(axes[0, 0])  # one step range for all metrics, tick labels kept on every subplot
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.legend(_run_handles(runs), list(runs), loc="outside lower center", ncols=min(len(runs), 4))
    return _save(fig, path)


def plot_runs(runs: dict[str, Metrics], out_dir: str | Path) -> list[Path]:
    """`loss.png`, `lr.png`, `throughput.png`, `eval.png` in `out_dir`: only those with data to show."""
    out_dir = Path(out_dir)
    written = []
    if _has(runs, "train", "loss"):
        written.append(plot_loss_curves(runs, out_dir / "loss.png"))
    if _has(runs, "train", "lr"):
        written.append(plot_train_metric(runs, "lr", out_dir / "lr.png", "learning rate", "lr", outline=True))
    if _has(runs, "train", "tokens_per_sec"):
        written.append(plot_train_metric(runs, "tokens_per_sec", out_dir / "throughput.png",
                                         "training throughput", "tokens / s"))
    if eval_metric_names(runs):
        written.append(plot_eval(runs, out_dir / "eval.png"))
    return written


def plot_bars(values: dict[str, dict[str, float]], metrics: list[str], path: str | Path,
              title: str = "held-out metrics") -> Path:
    """Grouped bars of held-out metrics: one subplot per metric, one annotated bar per model.

    `values` is `{model_label: {metric: value}}`; a model without a metric has no bar in that subplot.
    Subplots have their own y scales because metrics differ in units (perplexity vs agreement).
    """
    shown = [k for k in metrics if any(is_number(v.get(k)) for v in values.values())]
    if not shown:
        raise LmdistillError(f"{path}: none of the metrics {metrics} has a value for any model.")
    models = list(values)
    fig, axes = _figure(1, len(shown), width=max(3.2 * len(shown), 1.1 * len(models) * len(shown)), height=4.2)
    for ax, metric in zip(axes.flat, shown):
        xs = [j for j, m in enumerate(models) if is_number(values[m].get(metric))]
        ys = [float(values[models[j]][metric]) for j in xs]
        bars = ax.bar(xs, ys, color=[_colour(j) for j in xs], width=0.7)
        ax.bar_label(bars, labels=[_short(y) for y in ys], padding=2, fontsize=9)
        tilt = {"rotation": 20, "ha": "right", "rotation_mode": "anchor"} if len(models) > 2 else {}
        ax.set_xticks(range(len(models)), models, **tilt)
        ax.set_xlim(-0.6, len(models) - 0.4)  # a model without this metric keeps its (empty) slot
        ax.margins(y=0.15)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _short(value: float) -> str:
    """A bar annotation: 4 significant digits, thousands separators from 1000 up."""
    return f"{value:,.0f}" if math.isfinite(value) and abs(value) >= 1000 else f"{value:.4g}"

