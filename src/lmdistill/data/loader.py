"""A data file -> training examples `{"input_ids": [...], "labels": [...]}` with counts of what happened.

    examples = load_examples("train.jsonl", tokenizer, max_seq_len=512)
    print(examples.stats.summary())

Conversations (every format but plain text) are rendered with the tokenizer's chat template and truncated to
`max_seq_len` (the start is kept). Plain text is pretraining data: documents, each followed by EOS, form one
token stream cut into blocks of `max_seq_len` tokens, every token trained. The file's format is detected from
its first usable record (or given); every later record must have that shape. Nothing is dropped silently:
bad records raise (or, with `skip_bad_records`, are counted with their first line numbers), and truncated
examples and examples left without a trained token are counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from lmdistill.data.formats import Parsed, detect_format, normalize_format, parse_record, record_texts
from lmdistill.data.readers import iter_raw_records
from lmdistill.data.render import IGNORE_INDEX, render_conversation_examples
from lmdistill.data.stats import DataStats, Examples, check_trainable
from lmdistill.errors import LmdistillError

T = TypeVar("T")


def load_examples(path: str | Path, tokenizer, max_seq_len: int = 512, data_format: str = "auto",
                  skip_bad_records: bool = False, num_proc: int | None = None, cache_dir: str | Path | None = None):
    """Read `path` (JSONL, JSON list, parquet, datasets folder, .txt) into training examples, through the
    tokenized store (`lmdistill.data.store`): tokenized with `num_proc` processes the first time these inputs are
    seen, opened memory-mapped afterwards. Returns a read-only sequence of the dicts `tokenize_examples` makes, in
    the same order, with the same `.stats`."""
    from lmdistill.data.store import open_or_build

    return open_or_build(path, tokenizer, max_seq_len, data_format, skip_bad_records, num_proc, cache_dir)


def tokenize_examples(path: str | Path, tokenizer, max_seq_len: int = 512, data_format: str = "auto",
                      skip_bad_records: bool = False) -> Examples:
    """Read `path` (JSONL, JSON list, parquet, datasets folder, .txt) into training examples in memory, in one
    process (the reference the store is tested against).

    Each example has `input_ids` and `labels` (lists of int, equal length <= max_seq_len, -100 where not
    trained) and at least one trained label a shifted loss can use (position >= 1).
    Raises LmdistillError on a bad record (file, line and what is wrong), an empty file, or no trainable token.
    """
    if max_seq_len < 2:
        raise LmdistillError(f"max_seq_len must be at least 2, found {max_seq_len}.")
    stats = DataStats(source=str(path), data_format=normalize_format(data_format), max_seq_len=max_seq_len)
    examples = Examples(stats=stats)
    packer = _TextPacker(tokenizer, max_seq_len)

    def convert(parsed: Parsed) -> list[tuple[list[int], list[int]]]:
        if isinstance(parsed, str):
            return packer.add(parsed)
        sequences = render_conversation_examples(tokenizer, parsed)
        stats.split_sequences += len(sequences) - 1
        return [_truncate(ids, labels, max_seq_len, stats) for ids, labels in sequences]

    for sequences in iter_parsed(path, stats, skip_bad_records, convert):
        _extend(examples, sequences)
    _extend(examples, packer.finish())
    check_trainable(examples.stats)
    return examples


def iter_texts(path: str | Path, data_format: str = "auto", skip_bad_records: bool = False) -> Iterator[str]:
    """The natural-language texts of a data file in any supported format (message contents, documents)."""
    stats = DataStats(source=str(path), data_format=normalize_format(data_format))
    for texts in iter_parsed(path, stats, skip_bad_records, record_texts):
        yield from texts


def iter_parsed(path: str | Path, stats: DataStats, skip_bad_records: bool,
                convert: Callable[[Parsed], T]) -> Iterator[T]:
    """`convert(parsed record)` for every record of `path`, in the format `stats.data_format` ("auto": the
    first usable record's). A malformed record, or one `convert` rejects with LmdistillError, raises with its
    location, or is counted in `stats` when `skip_bad_records`. An empty file raises."""
    detected_at = None
    for raw in iter_raw_records(path):
        stats.records += 1
        try:
            if raw.error is not None:
                raise LmdistillError(raw.error)
            data_format = detect_format(raw.record) if stats.data_format == "auto" else stats.data_format
            parsed = parse_record(raw.record, data_format)
            if stats.data_format == "auto":  # the first record of a valid shape sets the file's format
                stats.data_format, detected_at = data_format, raw.location
            result = convert(parsed)
        except LmdistillError as exc:
            if skip_bad_records:
                stats.add_bad(raw.number, raw.unit)
                continue
            shape = raw.error is None and detected_at not in (None, raw.location)
            note = f" The file's format '{stats.data_format}' was detected from {detected_at}." if shape else ""
            raise LmdistillError(f"{raw.location}: {exc}{note} (skip_bad_records / --skip_bad_records skips "
                                 "bad records instead.)") from None
        yield result
    if stats.records == 0:
        raise LmdistillError(f"{path}: empty file: no records found.")


def _truncate(ids: list[int], labels: list[int], max_seq_len: int, stats: DataStats) -> tuple[list[int], list[int]]:
    if len(ids) > max_seq_len:
        stats.truncated += 1
        return ids[:max_seq_len], labels[:max_seq_len]
    return ids, labels


def _extend(examples: Examples, sequences: Iterable[tuple[list[int], list[int]]]) -> None:
    """Append the sequences with a usable trained label; count the others and the tokens."""
    stats = examples.stats
    for ids, labels in sequences:
        trained = sum(label != IGNORE_INDEX for label in labels)
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted after the shift
            stats.dropped_no_trained += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained


class _TextPacker:
    """Plain-text documents -> one token stream (each document followed by EOS) -> blocks of `block` tokens.

    Every token is trained (labels == input_ids). The last, shorter block is kept (dropped and counted if it
    has a single token, which no shifted loss can use).
    """

    def __init__(self, tokenizer, block: int):
        self.tokenizer, self.block, self.buffer = tokenizer, block, []

    def add(self, text: str) -> list[tuple[list[int], list[int]]]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise LmdistillError("the tokenizer has no eos token, needed to separate plain-text documents.")
        self.buffer += self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
        cut = len(self.buffer) - len(self.buffer) % self.block
        blocks = [self.buffer[k: k + self.block] for k in range(0, cut, self.block)]
        del self.buffer[:cut]
        return [(ids, list(ids)) for ids in blocks]

    def finish(self) -> list[tuple[list[int], list[int]]]:
        ids, self.buffer = self.buffer, []
        return [(ids, list(ids))] if ids else []
