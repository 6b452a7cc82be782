"""Progress and ETA (`lmdistill.progress`, the training loop's `MetricsLogger`): the ETA is measured from the end
of the first step, so a slow warm-up step does not inflate it; plain lines off a terminal, a bar on one.
A fake clock makes every number exact."""

from __future__ import annotations

import io
import json
import sys

import pytest

from lmdistill import progress
from lmdistill.train.metrics import MetricsLogger


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def _record(step: int) -> dict:
    return {"step": step, "loss": 2.0, "kd_loss": None, "ce_loss": 2.0, "lr": 1e-3, "tokens_per_sec": 1000.0}


def _run(logger: MetricsLogger, clock: FakeClock, steps: int, first: float = 30.0, each: float = 1.0,
         after: int | None = None) -> None:
    """`steps` steps after step `after` (default: where the logger starts); the first takes `first` seconds
    (warm-up), every later one `each`."""
    start = logger.start_step if after is None else after
    for step in range(start + 1, start + steps + 1):
        clock.now += first if step == start + 1 else each
        logger.step(step, _record(step), log=True)


def test_eta_is_not_inflated_by_a_slow_first_step(tmp_path, clock, capsys):
    logger = MetricsLogger(tmp_path, total_steps=100, start_step=0, is_main=True)
    assert logger.bar is None  # pytest captures stderr: not a terminal
    _run(logger, clock, steps=11)  # 30 s, then 10 x 1 s
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11
    assert lines[0].endswith("ETA --")  # one step tells nothing about the rate yet
    assert lines[1].endswith("ETA 1.6 min")  # 98 steps left at 1 step/s
    # 89 steps left at 1 step/s = 1.5 min (timed from the start it would say 41 s / 11 steps * 89 = 5.5 min)
    assert lines[10].startswith("step 11/100") and lines[10].endswith("ETA 1.5 min")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 12))  # the records themselves are unchanged


def test_eta_after_resume_counts_from_the_first_resumed_step(tmp_path, clock, capsys):
    logger = MetricsLogger(tmp_path, total_steps=100, start_step=60, is_main=True)
    _run(logger, clock, steps=5, first=12.0, each=2.0)  # steps 61..65: 12 s, then 4 x 2 s
    logger.close()
    assert capsys.readouterr().out.splitlines()[-1].endswith("ETA 1.2 min")  # 35 steps x 2 s = 70 s


def test_the_bar_shows_the_same_eta_on_a_terminal(tmp_path, clock, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    logger = MetricsLogger(tmp_path, total_steps=100, start_step=0, is_main=True)
    assert logger.bar is not None
    _run(logger, clock, steps=1)
    assert "ETA=--" in str(logger.bar)
    _run(logger, clock, steps=10, first=1.0, after=1)  # steps 2..11, 1 s each
    shown = str(logger.bar)
    logger.close()
    assert "11/100" in shown and "ETA=1.5 min" in shown and "loss=2.0000" in shown


def test_rate_starts_at_the_first_update(clock):
    rate = progress.Rate()
    assert rate.eta(10) is None
    clock.now = 100.0
    rate.update(1)
    assert rate.per_second() is None and rate.eta(10) is None
    clock.now = 104.0
    rate.update(3)
    assert rate.per_second() == pytest.approx(0.5) and rate.eta(10) == pytest.approx(14.0)
    assert progress.format_eta(None) == "--" and progress.format_eta(90.0) == "1.5 min"


def test_progress_off_a_terminal_prints_a_line_per_tenth(clock, capsys):
    p = progress.Progress(40, "cache-teacher", "examples")
    assert p.bar is None
    for done in range(0, 40, 3):
        clock.now += 1.0
        p.update(min(3, 40 - done), note=f"{done} positions")
    p.close()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "\r" not in captured.err + captured.out
    assert [ln.split()[1] for ln in lines] == ["6/40", "9/40", "12/40", "18/40", "21/40", "24/40", "30/40",
                                              "33/40", "36/40", "40/40"]
    assert lines[0] == "cache-teacher: 6/40 examples (15%), 3.0 examples/s, ETA 0.2 min, 3 positions"
    assert lines[-1].startswith("cache-teacher: 40/40 examples (100%)")
    quiet = progress.Progress(40, "cache-teacher", "examples", enabled=False)
    quiet.update(40)
    assert capsys.readouterr().out == ""
