"""Progress (`lmdistill.progress`): the rate is measured from the end of the first unit of work; plain lines off
a terminal. A fake clock makes every number exact."""

from __future__ import annotations

import pytest

from lmdistill import progress


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
