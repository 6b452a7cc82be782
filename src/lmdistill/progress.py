"""Progress of long loops (training steps, cached examples): a tqdm bar on a terminal, plain lines elsewhere
(a log file, CI, a pipe), where a bar's carriage returns pile up into one unreadable line.

ETAs come from `Rate`, whose clock starts at the end of the first unit of work: the first step pays for
warm-up (thread pools, the allocator, first-touch pages, lazy initialisation) and, timed from the start,
would inflate every early ETA several-fold.
"""

from __future__ import annotations

import sys
import time


def interactive() -> bool:
    """Whether progress goes to a terminal (a bar) or to a file or pipe (plain lines)."""
    return sys.stderr.isatty()


class Rate:
    """Units of work per second, measured from the end of the first `update` to the latest one."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None  # (units done, time) after the first update
        self.last: tuple[int, float] | None = None

    def update(self, done: int) -> None:
        """`done`: units completed so far (cumulative)."""
        point = (done, time.perf_counter())
        if self.first is None:
            self.first = point
        else:
            self.last = point

    def per_second(self) -> float | None:
        """None until two updates with progress and time between them."""
        if self.first is None or self.last is None:
            return None
        units, seconds = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return units / seconds if units > 0 and seconds > 0 else None

    def eta(self, total: int) -> float | None:
        """Seconds left to reach `total` at the measured rate; None while the rate is unknown."""
        rate = self.per_second()
        return None if rate is None else max(total - self.last[0], 0) / rate


def format_eta(seconds: float | None) -> str:
    return "--" if seconds is None else f"{seconds / 60:.1f} min"


def bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar whose ETA is `Rate`'s, shown in the postfix (tqdm's own is an average that includes warm-up)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")


class Progress:
    """`total` units of work: a bar on a terminal; elsewhere a plain line each time another tenth is done,
    e.g. `cache-teacher: 16/40 examples (40%), 3.1 examples/s, ETA 0.1 min, 1,234 positions`."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, lines: int = 10):
        self.total, self.desc, self.unit, self.lines = total, desc, unit, lines
        self.done, self.rate = 0, Rate()
        self.bar = bar(total, desc, unit) if enabled and interactive() else None
        self.plain = enabled and self.bar is None

    def update(self, n: int, note: str = "") -> None:
        before, self.done = self.done, self.done + n
        self.rate.update(self.done)
        eta = format_eta(self.rate.eta(self.total))
        if self.bar is not None:
            self.bar.set_postfix_str(f"ETA {eta}" + (f", {note}" if note else ""), refresh=False)
            self.bar.update(n)
        elif self.plain and (self.done >= self.total or
                             self.done * self.lines // max(self.total, 1) > before * self.lines // max(self.total, 1)):
            rate = self.rate.per_second()
            speed = f"{rate:.1f} {self.unit}/s" if rate is not None else f"-- {self.unit}/s"
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / max(self.total, 1):.0%}), "
                  f"{speed}, ETA {eta}" + (f", {note}" if note else ""), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
