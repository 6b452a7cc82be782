"""What loading a data file did (`DataStats`), and the in-memory list of examples that carries it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from lmdistill.errors import LmdistillError

MAX_BAD_LINES = 10


@dataclass
class DataStats:
    """What `load_examples` did with a file. `bad_record_lines` holds the first 10 bad line numbers (JSONL,
    1-based) or record indices (JSON lists, parquet, datasets folders, 0-based; see `bad_unit`)."""

    source: str = ""
    data_format: str = "auto"
    max_seq_len: int = 0
    records: int = 0  # records read, bad ones included
    examples: int = 0
    truncated: int = 0
    dropped_no_trained: int = 0  # examples with no trained token left after truncation
    bad_records: int = 0
    bad_record_lines: list[int] = field(default_factory=list)
    bad_unit: str = "line"
    tokens: int = 0
    trained_tokens: int = 0
    split_sequences: int = 0  # extra sequences made because the template rewrites earlier turns (Qwen3)

    def add_bad(self, number: int, unit: str) -> None:
        self.bad_records += 1
        self.bad_unit = unit
        if len(self.bad_record_lines) < MAX_BAD_LINES:
            self.bad_record_lines.append(number)

    def summary(self) -> str:
        """One paragraph for a person: what was read, made, cut, dropped and skipped."""
        unit = "block" if self.data_format == "text" else "example"
        parts = [f"{self.source} ({self.data_format}): {_n(self.records, 'record')} read -> {_n(self.examples, unit)} "
                 f"of at most {self.max_seq_len} tokens, {self.tokens:,} tokens of which {self.trained_tokens:,} "
                 f"trained ({100 * self.trained_tokens / max(self.tokens, 1):.1f}%)."]
        if self.split_sequences:
            parts.append(f"{self.split_sequences:,} extra sequences because the chat template renders earlier "
                         "assistant turns differently (each turn is trained once, as the model produces it).")
        parts.append(f"{self.truncated:,} truncated to {self.max_seq_len} tokens; {self.dropped_no_trained:,} "
                     "dropped because no trained token survived truncation.")
        if self.bad_records:
            where = ", ".join(map(str, self.bad_record_lines)) + (", ..." if self.bad_records > MAX_BAD_LINES else "")
            parts.append(f"{_n(self.bad_records, 'bad record')} skipped ({self.bad_unit}s {where}).")
        return " ".join(parts)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class Examples(list):
    """A list of `{"input_ids": list[int], "labels": list[int]}` that also carries `.stats` (DataStats)."""

    def __init__(self, items: Iterable[dict] = (), stats: DataStats | None = None):
        super().__init__(items)
        self.stats = stats if stats is not None else DataStats()


def check_trainable(stats: DataStats) -> None:
    """Refuse data that gave no example with a trained token, saying why (all bad, or all cut away)."""
    if stats.examples:
        return
    if stats.bad_records == stats.records:
        raise LmdistillError(f"{stats.source}: no usable record: all {stats.records:,} records are bad "
                             f"({stats.bad_unit}s {', '.join(map(str, stats.bad_record_lines))}).")
    raise LmdistillError(
        f"{stats.source}: no trainable token: {stats.records:,} records gave no example with a trained token "
        f"({stats.truncated:,} truncated to max_seq_len={stats.max_seq_len}, {stats.dropped_no_trained:,} dropped "
        "because nothing trained survived truncation). Raise max_seq_len or check the data.")
