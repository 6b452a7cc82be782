"""`lmdistill report`: reading metrics.jsonl, PNGs that open, a summary whose numbers come from the data."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from lmdistill.cli import main
from lmdistill.errors import LmdistillError
from lmdistill.report import plot_bars, plot_loss_curves, plot_runs, read_metrics, summarize, write_report

STEPS = range(10, 101, 10)


def _train(step: int, kd: bool) -> dict:
    ce = 2.0 + 3.0 * math.exp(-step / 30) + 0.01 * (step % 3)
    kd_loss = 1.0 + 2.0 * math.exp(-step / 25) if kd else None
    return {"type": "train", "step": step, "loss": 0.5 * ce + 0.5 * kd_loss if kd else ce, "kd_loss": kd_loss,
            "ce_loss": ce, "lr": 1e-3 * (1 - step / 200), "grad_norm": 1.0,
            "tokens_per_sec": 1500.0 + 37.0 * (step % 4) - (400 if kd else 0), "trained_tokens": 900,
            "tokens": 1024, "epoch": step / 50}


def _eval(step: int, kd: bool) -> dict:
    ce = 2.5 + 1.0 / step
    record = {"type": "eval", "step": step, "ce": ce, "ppl": math.exp(ce), "bits_per_byte": ce / math.log(2) / 3,
              "tokens": 512}
    return {**record, "kl_to_teacher": 0.5 + 1 / step, "agreement": 0.4 + step / 1000} if kd else record


def write_run(path, kd: bool, evals: bool = True):
    """A run directory as the training loop leaves it: metrics.jsonl and lmdistill_config.yaml."""
    path.mkdir(parents=True)
    records = []
    for step in STEPS:
        records.append(_train(step, kd))
        if evals and step % 50 == 0:
            records.append(_eval(step, kd))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = ("command: distill\nteacher: [runs/teacher, runs/teacher_b]\nstudent: nano\ndivergence: reverse_kl\nalpha: 0.25\n"
              "temperature: 2.0\n" if kd else "command: train\nmodel: nano\n")
    (path / "lmdistill_config.yaml").write_text(config)
    return path


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return write_run(root / "ce_run", kd=False), write_run(root / "kd_run", kd=True)


@pytest.fixture(scope="module")
def runs(run_dirs):
    return {d.name: read_metrics(d) for d in run_dirs}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(runs, out, title="test report")


def assert_png(path, min_bytes: int = 5_000):
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 200
        image.verify()


def test_read_metrics_splits_records_and_reads_config(runs):
    ce, kd = runs["ce_run"], runs["kd_run"]
    assert [r["step"] for r in ce["train"]] == list(STEPS)
    assert [r["step"] for r in kd["eval"]] == [50, 100]
    assert all(r["kd_loss"] is None for r in ce["train"])
    assert kd["config"]["divergence"] == "reverse_kl" and ce["config"]["command"] == "train"


def test_summary_takes_last_values_and_mean_throughput(runs):
    kd = runs["kd_run"]
    s = summarize(kd)
    assert s["steps"] == 100
    assert s["loss"] == kd["train"][-1]["loss"] and s["kd_loss"] == kd["train"][-1]["kd_loss"]
    speeds = [r["tokens_per_sec"] for r in kd["train"]]
    assert s["tokens_per_sec"] == pytest.approx(sum(speeds) / len(speeds))
    assert s["eval"]["agreement"] == kd["eval"][-1]["agreement"]
    assert summarize(runs["ce_run"]).get("kd_loss") is None


@pytest.mark.parametrize("bad, found", [
    ('{"type": "train", "step": 3, "loss": ', "invalid JSON"),
    ("[1, 2]", "found list"),
    ('{"type": "train", "loss": 1.0}', "integer 'step'"),
    ('{"step": 4}', "'type' field"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, found):
    lines = [json.dumps(_train(1, kd=False)), "", bad]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LmdistillError, match=r"metrics\.jsonl:3: ") as info:
        read_metrics(tmp_path)
    assert found in str(info.value)


def test_missing_run_or_metrics_is_a_user_error(tmp_path):
    with pytest.raises(LmdistillError, match="does not exist"):
        read_metrics(tmp_path / "nope")
    with pytest.raises(LmdistillError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"type": "note", "step": 0}\n')
    with pytest.raises(LmdistillError, match="no train or eval records"):
        read_metrics(tmp_path)


def test_plot_runs_writes_valid_pngs(report):
    for name in ("loss", "lr", "throughput", "eval"):
        assert_png(report.parent / f"{name}.png")


def test_plot_runs_skips_plots_without_data(tmp_path):
    runs = {"a": read_metrics(write_run(tmp_path / "a", kd=False, evals=False))}
    written = plot_runs(runs, tmp_path / "out")
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "throughput.png"]
    assert not (tmp_path / "out" / "eval.png").exists()


def _table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The summary table as {run: {column: cell}}."""
    lines = [ln for ln in markdown.split("## Summary")[1].split("##")[0].splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_report_table_numbers_come_from_the_data(report, runs):
    rows = _table_rows(report.read_text())
    assert set(rows) == {"ce_run", "kd_run"}
    for label, m in runs.items():
        row, last = rows[label], m["train"][-1]
        assert int(row["steps"]) == last["step"]
        assert _num(row["final loss"]) == pytest.approx(last["loss"], abs=1e-4)
        assert _num(row["final CE"]) == pytest.approx(last["ce_loss"], abs=1e-4)
        speeds = [r["tokens_per_sec"] for r in m["train"]]
        assert _num(row["mean tokens/s"]) == pytest.approx(sum(speeds) / len(speeds), abs=0.5)
        assert _num(row["ppl"]) == pytest.approx(m["eval"][-1]["ppl"], abs=1e-4)
    assert rows["ce_run"]["final KD"] == "—" and rows["ce_run"]["agreement"] == "—"
    assert _num(rows["kd_run"]["final KD"]) == pytest.approx(runs["kd_run"]["train"][-1]["kd_loss"], abs=1e-4)
    assert _num(rows["kd_run"]["agreement"]) == pytest.approx(runs["kd_run"]["eval"][-1]["agreement"], abs=1e-4)


def test_report_embeds_plots_and_config(report):
    text = report.read_text()
    assert text.startswith("# test report")
    for name in ("loss", "lr", "throughput", "eval"):
        assert f"![{name}]({name}.png)" in text
    config = text.split("## Configuration")[1]
    assert "| kd_run | distill | runs/teacher, runs/teacher_b | nano | reverse_kl | 0.25 | 2.0 |" in config
    assert "| ce_run | train | — | nano | — | — | — |" in config


def test_plot_loss_curves_and_bars_alone(runs, tmp_path):
    assert_png(plot_loss_curves(runs, tmp_path / "curves.png", "losses"))
    values = {"teacher": {"ppl": 9.5, "agreement": 1.0}, "ce": {"ppl": 14.2, "agreement": 0.41},
              "kd": {"ppl": 12.8}}
    assert_png(plot_bars(values, ["ppl", "agreement", "kl_to_teacher"], tmp_path / "bars.png", "held-out"))
    with pytest.raises(LmdistillError, match="kl_to_teacher"):
        plot_bars(values, ["kl_to_teacher"], tmp_path / "none.png", "held-out")


def test_cli_end_to_end(run_dirs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["report", *map(str, run_dirs), "--output_dir", str(out), "--labels", "CE,KD"]) == 0
    printed = capsys.readouterr().out
    assert "| CE |" in printed and "| KD |" in printed and "final loss" in printed
    assert set(_table_rows((out / "report.md").read_text())) == {"CE", "KD"}
    for name in ("loss", "lr", "throughput", "eval"):
        assert_png(out / f"{name}.png")


def test_cli_errors_are_one_paragraph(run_dirs, tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["report", *map(str, run_dirs), "--labels", "only_one"]) == 1
    assert "--labels: expected 2 labels" in capsys.readouterr().err


def test_cli_defaults_output_to_first_run_dir(tmp_path, capsys):
    run = write_run(tmp_path / "solo", kd=True, evals=False)
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "loss.png").is_file()


def _legend(fig, title: str) -> dict[str, object]:
    """A figure legend's entries, {text: handle}, by the legend's title."""
    legend = next(lg for lg in fig.legends if lg.get_title().get_text() == title)
    return {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}


def test_loss_legend_lists_only_parts_that_are_drawn(runs):
    from lmdistill.report.plots import loss_figure

    # alpha 0, T 1: the KD part is the total's own curve, which would hide it under the solid line
    alpha0 = {"train": [{**r, "loss": r["kd_loss"]} for r in runs["kd_run"]["train"]], "eval": [], "config": {}}
    for case, expect_kd in (({"ce": runs["ce_run"], "kd": alpha0}, False), (runs, True)):
        fig = loss_figure(case)
        styles = {line.get_linestyle() for line in fig.axes[0].get_lines()}
        parts = _legend(fig, "part")
        for text, handle in parts.items():
            assert handle.get_linestyle() in styles, text  # every style in the legend has a line
        assert ("KD part" in parts) == expect_kd and (":" in styles) == expect_kd
        assert "CE part" in parts and "--" in styles
    assert "total (= KD part)" in _legend(loss_figure({"ce": runs["ce_run"], "kd": alpha0}), "part")
    both = _legend(loss_figure({"kd": runs["kd_run"], "kd at alpha 0": alpha0}), "part")
    assert list(both) == ["total (= KD part of kd at alpha 0)", "CE part", "KD part"]
    only_ce = loss_figure({"ce": runs["ce_run"]})
    assert [lg.get_title().get_text() for lg in only_ce.legends] == ["run"]  # no parts to name


def test_colours_follow_labels_when_given(runs):
    from matplotlib.colors import to_hex

    from lmdistill.report.plots import bars_figure, loss_figure

    colours = {"kd_run": "C2", "ce_run": "C1", "teacher": "C0"}
    lines = loss_figure(runs, colours=colours).axes[0].get_lines()
    assert lines
    for line in lines:
        assert to_hex(line.get_color()) == to_hex(colours[line.get_label().split(":")[0]]), line.get_label()
    ax = bars_figure({"ce_run": {"ppl": 2.0}, "teacher": {"ppl": 1.0}, "kd_run": {"ppl": 3.0}}, ["ppl"],
                     colours=colours).axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert [to_hex(p.get_facecolor()) for p in ax.patches] == [to_hex(colours[m]) for m in shown]
    # without colours: by position, as before
    default = loss_figure(runs).axes[0].get_lines()
    assert {to_hex(line.get_color()) for line in default if line.get_label().startswith("ce_run")} == {to_hex("C0")}


def test_bars_show_percent_with_interval_error_bars():
    from matplotlib.container import ErrorbarContainer

    from lmdistill.report.plots import bars_figure

    values = {"teacher": {"ppl": 3.1, "accuracy": 0.825}, "ce": {"ppl": 7.0, "accuracy": 0.2833}}
    intervals = {"teacher": {"accuracy": (0.747, 0.883)}, "ce": {"accuracy": (0.210, 0.370)}}
    fig = bars_figure(values, ["ppl", "accuracy"], intervals=intervals, percent=["accuracy"])
    ppl, acc = fig.axes
    assert [p.get_height() for p in acc.patches] == pytest.approx([82.5, 28.33])
    errors = [c for c in acc.containers if isinstance(c, ErrorbarContainer)]
    assert len(errors) == 1
    segments = errors[0].lines[2][0].get_segments()  # one vertical segment per bar: (x, low), (x, high)
    assert [v for s in segments for v in (s[0][1], s[1][1])] == pytest.approx([74.7, 88.3, 21.0, 37.0])
    assert "%" in acc.get_title() and "95% CI" in acc.get_title()
    assert {t.get_text() for t in acc.texts} == {"82.5%", "28.3%"}
    assert not [c for c in ppl.containers if isinstance(c, ErrorbarContainer)] and "%" not in ppl.get_title()
    assert [p.get_height() for p in ppl.patches] == pytest.approx([3.1, 7.0])


def test_a_new_named_loss_term_shows_without_edits(tmp_path):
    """Whatever terms an objective logs (`NAME_loss`) reach the summary table and the loss plot's legend."""
    from lmdistill.report.markdown import summary_table
    from lmdistill.report.plots import loss_figure

    path = write_run(tmp_path / "hidden_run", kd=True)
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if r["type"] == "train":
            r["hidden_loss"] = 0.1 + 1.0 / r["step"]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {"hidden_run": read_metrics(path)}
    assert "final hidden" in summary_table(runs).splitlines()[0]
    legends = [t.get_text() for legend in loss_figure(runs).legends for t in legend.get_texts()]
    assert "hidden part" in legends and "KD part" in legends
