"""What a run shows and records: a progress bar on a terminal (a plain line per log interval elsewhere),
`metrics.jsonl` with one JSON object per logged step or evaluation (plus the health module's events), and
optional trackers (wandb, tensorboard, swanlab) through accelerate.

The ETA (bar and lines alike) is `lmdistill.progress.Rate`'s: steps per second since the end of the run's first
step, so the first step's warm-up does not inflate it; the first step's own line has no ETA (`ETA --`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmdistill.progress import Rate, bar, format_eta, interactive


FIRST_TERMS = ("kd", "ce")  # shown first; any other named term of the objective follows in name order


def loss_terms(record: dict) -> list[str]:
    """The named loss terms of a logged step (`kd_loss`, `ce_loss`, `aux_loss`, ... -> kd, ce, aux, ...)."""
    names = [k[: -len("_loss")] for k, v in record.items() if k.endswith("_loss") and v is not None]
    return sorted(names, key=lambda t: (FIRST_TERMS.index(t) if t in FIRST_TERMS else len(FIRST_TERMS), t))


def _finite(value):
    """NaN and infinities as JSON null (strict JSON has neither), inside lists and dicts too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One strict-JSON line of metrics.jsonl (non-finite numbers written as null)."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


class MetricsLogger:
    """Writes metrics on the main process only; every method is a no-op elsewhere."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, is_main: bool, accelerator=None,
                 trackers: bool = False):
        self.is_main, self.accelerator, self.trackers = is_main, accelerator, trackers
        self.total, self.start_step, self.rate = total_steps, start_step, Rate()
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8") if is_main else None
        self.bar = bar(total_steps, "train", "step", initial=start_step) if is_main and interactive() else None

    def _write(self, record: dict) -> None:
        self.file.write(json_line(record))
        self.file.flush()
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def step(self, step: int, record: dict, log: bool) -> None:
        if not self.is_main:
            return
        self.rate.update(step)
        if self.bar is not None:
            self.bar.set_postfix(ETA=format_eta(self.rate.eta(self.total)), loss=f"{record['loss']:.4f}",
                                 lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
        if log:
            self._write({"type": "train", **record})
            if self.bar is None:
                print(self._line(step, record), flush=True)

    def _line(self, step: int, r: dict) -> str:
        parts = f"loss {r['loss']:.4f}"
        terms = loss_terms(r)
        if terms and terms != ["ce"]:  # a lone CE term is the loss itself
            parts += " (" + ", ".join(f"{t} {r[t + '_loss']:.4f}" for t in terms) + ")"
        return (f"step {step}/{self.total}  {parts}  lr {r['lr']:.2e}  {r['tokens_per_sec']:.0f} tok/s  "
                f"ETA {format_eta(self.rate.eta(self.total))}")

    def eval(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        self._write({"type": "eval", "step": step, **metrics})
        text = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.message(f"eval @ step {step}: {text}")

    def event(self, kind: str, step: int, fields: dict, text: str | None = None) -> None:
        """A record of another type (`health`, `best`, `early_stop`, `final`: `lmdistill.train.health`) in
        metrics.jsonl, not sent to trackers, and its line in the log."""
        if not self.is_main:
            return
        self.file.write(json_line({"type": kind, "step": step, **fields}))
        self.file.flush()
        if text:
            self.message(text)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.trackers:
            self.accelerator.end_training()
