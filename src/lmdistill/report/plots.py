"""PNG plots of one or more runs, and grouped bars of held-out metrics of several models.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never through `pyplot`: no display is
needed, no global backend is switched under a user's notebook, and no figure outlives its function. Each run
keeps one colour across every plot: `C0`, `C1`, ... by its position in `runs`, or the one `colours` gives its
label (the quickstart fixes one per model, so a model keeps its colour in plots of different sets of runs).
`loss_figure` and `bars_figure` build the figures the `plot_*` functions save.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lmdistill.errors import LmdistillError
from lmdistill.report.runs import Metrics, eval_metric_names, has_kd, is_number, series, term_names

# Pretty names and which way is better, for titles.
METRIC_LABELS = {
    "ce": "eval CE (nats/token) ↓", "ppl": "perplexity ↓", "bits_per_byte": "bits per byte ↓",
    "kl_to_teacher": "KL(teacher ‖ model) ↓", "agreement": "top-1 agreement with teacher ↑",
    "accuracy": "exact match ↑", "entropy": "next-token entropy (nats)", "teacher_ce": "teacher's eval CE",
}
_STYLES = {"loss": ("-", "total"), "ce_loss": ("--", "CE part"), "kd_loss": (":", "KD part")}
_MORE_STYLES = ("-.", (0, (1, 1)), (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))  # other named terms (aux, hidden, ...)
Colours = dict[str, str]  # run or model label -> a matplotlib colour


def _style(key: str) -> tuple:
    """Line style and legend name of a loss curve: total, CE part, KD part, then any other named term."""
    if key in _STYLES:
        return _STYLES[key]
    term = key.removesuffix("_loss")
    return _MORE_STYLES[sum(map(ord, term)) % len(_MORE_STYLES)], f"{term} part"


def _figure(nrows: int = 1, ncols: int = 1, width: float = 7.5, height: float = 4.5):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _colours(labels: Sequence[str], colours: Colours | None = None) -> list[str]:
    """One colour per label: `colours[label]` when given, else `C0`, `C1`, ... by position."""
    return [(colours or {}).get(label, f"C{i % 10}") for i, label in enumerate(labels)]


def _has(runs: dict[str, Metrics], kind: str, key: str) -> bool:
    return any(series(m[kind], key)[0] for m in runs.values())


def plot_loss_curves(runs: dict[str, Metrics], path: str | Path, title: str = "training loss",
                     colours: Colours | None = None) -> Path:
    """`loss_figure` saved to `path`."""
    if not _has(runs, "train", "loss"):
        raise LmdistillError(f"{path}: no train records with a 'loss' to plot.")
    return save_figure(loss_figure(runs, title, colours), path)


def _same_curve(a: tuple[list, list], b: tuple[list, list]) -> bool:
    return a[0] == b[0] and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-8) for x, y in zip(a[1], b[1]))


def loss_figure(runs: dict[str, Metrics], title: str = "training loss", colours: Colours | None = None) -> Figure:
    """Total loss per run (solid) with its CE (dashed) and KD (dotted) parts for runs that distill.

    A part that is the total's own curve (CE-only runs; KD at alpha 0 and T 1) is not drawn: it would hide
    under the solid line; the total's legend entry says so. Colours name runs in one legend, line styles name
    the parts actually drawn in a second one. Each line is labelled `run: part`.
    """
    fig, axes = _figure()
    ax = axes[0, 0]
    drawn, hidden = set(), {}  # parts drawn; part -> runs where it equals the total
    for (label, m), colour in zip(runs.items(), _colours(list(runs), colours)):
        total = series(m["train"], "loss")
        for key in ("loss", *(f"{t}_loss" for t in term_names(m))) if has_kd(m) else ("loss",):
            steps, values = total if key == "loss" else series(m["train"], key)
            if not steps:
                continue
            if key != "loss" and _same_curve((steps, values), total):
                hidden.setdefault(key, []).append(label)
                continue
            ax.plot(steps, values, ls=_style(key)[0], color=colour, lw=1.4 if key == "loss" else 1.1,
                    label=f"{label}: {_style(key)[1]}")
            drawn.add(key)
    fig.legend(_run_handles(runs, colours), list(runs), title="run", loc="outside right upper")
    if drawn - {"loss"} or hidden:
        order = [*_STYLES, *sorted((drawn | set(hidden)) - set(_STYLES))]
        keys = [k for k in order if k in drawn]
        names = [_style(k)[1] for k in keys]
        same = [_style(k)[1] + (f" of {', '.join(hidden[k])}" if k in drawn else "")  # runs, if others draw it
                for k in order if k in hidden]
        if same and "loss" in keys:
            names[keys.index("loss")] += f" (= {', '.join(same)})"
        fig.legend([Line2D([], [], color="0.3", ls=_style(k)[0]) for k in keys], names, title="part",
                   loc="outside right lower")
    _decorate(ax, title, "loss")
    return fig


def _run_handles(runs: dict[str, Metrics], colours: Colours | None = None) -> list[Line2D]:
    return [Line2D([], [], color=c, lw=2) for c in _colours(list(runs), colours)]


def _decorate(ax, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_train_metric(runs: dict[str, Metrics], key: str, path: str | Path, title: str, ylabel: str,
                      outline: bool = False, colours: Colours | None = None) -> Path:
    """One non-negative train-record field (lr, tokens/s) against step, one line per run, y from 0.

    The legend sits outside the axes (constrained layout makes room) so it never hides a curve. With
    `outline`, earlier runs are drawn wider so identical curves (a shared lr schedule) stay visible.
    """
    fig, axes = _figure()
    ax = axes[0, 0]
    for i, (m, colour) in enumerate(zip(runs.values(), _colours(list(runs), colours))):
        steps, values = series(m["train"], key)
        ax.plot(steps, values, color=colour, lw=max(1.4, 3.4 - 1.0 * i) if outline else 1.4)
    fig.legend(_run_handles(runs, colours), list(runs), title="run", loc="outside right upper")
    if key == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)
    _decorate(ax, title, ylabel)
    return save_figure(fig, path)


def plot_eval(runs: dict[str, Metrics], path: str | Path, title: str = "evaluation",
              colours: Colours | None = None) -> Path:
    """Eval metrics against step, one subplot per metric any run logged; markers show each evaluation."""
    names = eval_metric_names(runs)
    if not names:
        raise LmdistillError(f"{path}: no eval records with numeric metrics to plot.")
    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.2 * ncols, height=3.4 * nrows + 0.6)
    for ax, name in zip(axes.flat, names):
        for m, colour in zip(runs.values(), _colours(list(runs), colours)):
            steps, values = series(m["eval"], name)
            ax.plot(steps, values, "o-", color=colour, lw=1.2, ms=4)
        _decorate(ax, METRIC_LABELS.get(name, name), "")
        if ax is not axes[0, 0]:
            ax.sharex(axes[0, 0])  # one step range for all metrics, tick labels kept on every subplot
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.legend(_run_handles(runs, colours), list(runs), loc="outside lower center", ncols=min(len(runs), 4))
    return save_figure(fig, path)


def plot_runs(runs: dict[str, Metrics], out_dir: str | Path, colours: Colours | None = None) -> list[Path]:
    """`loss.png`, `lr.png`, `throughput.png`, `eval.png` in `out_dir`: only those with data to show."""
    out_dir = Path(out_dir)
    written = []
    if _has(runs, "train", "loss"):
        written.append(plot_loss_curves(runs, out_dir / "loss.png", colours=colours))
    if _has(runs, "train", "lr"):
        written.append(plot_train_metric(runs, "lr", out_dir / "lr.png", "learning rate", "lr", outline=True,
                                         colours=colours))
    if _has(runs, "train", "tokens_per_sec"):
        written.append(plot_train_metric(runs, "tokens_per_sec", out_dir / "throughput.png",
                                         "training throughput", "tokens / s", colours=colours))
    if eval_metric_names(runs):
        written.append(plot_eval(runs, out_dir / "eval.png", colours=colours))
    return written


def plot_bars(values: dict[str, dict[str, float]], metrics: list[str], path: str | Path,
              title: str = "held-out metrics", colours: Colours | None = None,
              intervals: dict[str, dict[str, tuple[float, float]]] | None = None, percent: Sequence[str] = ()) -> Path:
    """`bars_figure` saved to `path`."""
    if not _shown_metrics(values, metrics):
        raise LmdistillError(f"{path}: none of the metrics {metrics} has a value for any model.")
    return save_figure(bars_figure(values, metrics, title, colours, intervals, percent), path)


def _shown_metrics(values: dict[str, dict[str, float]], metrics: list[str]) -> list[str]:
    return [k for k in metrics if any(is_number(v.get(k)) for v in values.values())]


def bars_figure(values: dict[str, dict[str, float]], metrics: list[str], title: str = "held-out metrics",
                colours: Colours | None = None, intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
                percent: Sequence[str] = ()) -> Figure:
    """Grouped bars of held-out metrics: one subplot per metric, one annotated bar per model.

    `values` is `{model_label: {metric: value}}`; a model without a metric has no bar in that subplot.
    Subplots have their own y scales because metrics differ in units (perplexity vs agreement).
    `intervals` `{model_label: {metric: (low, high)}}` (same units as the values) are drawn as error bars;
    metrics in `percent` (fractions such as exact match) are shown in percent, intervals included.
    """
    shown = _shown_metrics(values, metrics)
    models = list(values)
    model_colours = dict(zip(models, _colours(models, colours)))
    fig, axes = _figure(1, len(shown), width=max(3.2 * len(shown), 1.1 * len(models) * len(shown)), height=4.2)
    for ax, metric in zip(axes.flat, shown):
        scale = 100.0 if metric in percent else 1.0
        xs = [j for j, m in enumerate(models) if is_number(values[m].get(metric))]
        ys = [float(values[models[j]][metric]) * scale for j in xs]
        bounds = [(intervals or {}).get(models[j], {}).get(metric) for j in xs]
        yerr = None
        if any(b is not None for b in bounds):  # asymmetric: [below, above]; a model without one gets none
            yerr = [[y - b[0] * scale if b else 0.0 for y, b in zip(ys, bounds)],
                    [b[1] * scale - y if b else 0.0 for y, b in zip(ys, bounds)]]
        bars = ax.bar(xs, ys, color=[model_colours[models[j]] for j in xs], width=0.7, yerr=yerr, capsize=4,
                      error_kw={"elinewidth": 1.1, "ecolor": "0.2"})
        labels = [f"{y:.1f}%" if scale != 1.0 else _short(y) for y in ys]
        if yerr is None:
            ax.bar_label(bars, labels=labels, padding=2, fontsize=9)
        else:  # above the error bar, not under it
            for x, y, up, text in zip(xs, ys, yerr[1], labels):
                ax.annotate(text, (x, y + up), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=9)
        tilt = {"rotation": 20, "ha": "right", "rotation_mode": "anchor"} if len(models) > 2 else {}
        ax.set_xticks(range(len(models)), models, **tilt)
        ax.set_xlim(-0.6, len(models) - 0.4)  # a model without this metric keeps its (empty) slot
        ax.margins(y=0.15)
        unit = ", ".join(u for u, on in (("%", scale != 1.0), ("95% CI", yerr is not None)) if on)
        ax.set_title(METRIC_LABELS.get(metric, metric) + (f" ({unit})" if unit else ""), fontsize=10)
        if scale != 1.0:
            ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig


def _short(value: float) -> str:
    """A bar annotation: 4 significant digits, thousands separators from 1000 up."""
    return f"{value:,.0f}" if math.isfinite(value) and abs(value) >= 1000 else f"{value:.4g}"

