"""Schedules of a run: the learning rate (linear warmup, then cosine to a tenth, as MiniMind's) and the KD
temperature (constant, or annealed linearly or along a half cosine)."""

from __future__ import annotations

import math

LR_FLOOR = 0.1  # cosine decays to lr / 10, as MiniMind's schedule


def lr_lambda(warmup: int, total: int):
    """Linear warmup over `warmup` steps, then cosine from 1 to LR_FLOOR at step `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def temperature_at(step: int, total: int, start: float, end: float | None, schedule: str = "linear") -> float:
    """KD temperature of optimizer step `step` (0-based) of `total`: `start` throughout when `end` is None, else
    from `start` at the first step to `end` at the last, linearly or along a half cosine."""
    if end is None or total <= 1:
        return start
    progress = min(1.0, step / (total - 1))
    if schedule == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return start + (end - start) * progress
