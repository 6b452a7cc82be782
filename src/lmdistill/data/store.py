"""The tokenized store: a data file tokenized once, with every core, into memory-mapped Arrow files that every later
run, rank and command opens in a moment instead of tokenizing again.

    examples = load_examples("train.jsonl", tokenizer, 512)       # builds the store the first time, opens it later
    lmdistill data --data train.jsonl --tokenizer tok/ --max_seq_len 512 --prepare   # ahead of GPU time

A store lives in `cache_dir` (`--data_cache`; default `$LMDISTILL_CACHE/data`, else `~/.cache/lmdistill/data`) under
a key that fingerprints every input: the file (size, modification time and a checksum of its bytes: whole up to
64 MiB, else 64 sampled 64 KiB blocks plus both ends), the tokenizer (its vocabulary, merges and added tokens as
serialized by `tokenizers`, its special tokens), the chat template, `max_seq_len`, the format and
`skip_bad_records`. Changing any of them makes a new store; nothing stale is reused.

Building: JSONL files are split at line boundaries into shards that `datasets.Dataset.from_generator(num_proc=P)`
tokenizes in P processes (`--num_proc`, default every core, at least 2,000 records a process), each streaming its
rows to disk, so memory stays flat in the corpus size; other file types are read by one process. Each record is
rendered exactly as `lmdistill.data.loader` renders it (the same functions), bad records become rows that say
where and why, and the first of them is raised once every shard is done (or counted, with `skip_bad_records`). The
store is written under a temporary name and renamed when complete: a build killed half way leaves nothing a later
run uses. Several processes (DDP ranks) asking for the same store take an OS lock on it: one builds, the others wait
and then open it.

Reading: `StoredExamples` is a read-only sequence of `{"input_ids": list, "labels": list}` over the memory-mapped
Arrow table, with the loader's `.stats`; a process holds 8 bytes per example (the row index) and the token lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from lmdistill.data.formats import detect_format, normalize_format, parse_record
from lmdistill.data.identity import file_digest
from lmdistill.data.stats import DataStats, check_trainable
from lmdistill.data.readers import check_readable, iter_raw_records
from lmdistill.data.render import IGNORE_INDEX, chat_template, render_conversation_examples
from lmdistill.errors import LmdistillError, guarded_write

STORE_VERSION = 1
RECORDS_PER_PROCESS = 2000  # fewer records than this per process are not worth another process
SHARDS_PER_PROCESS = 4
# a row: an example, a bad record, a dropped sequence (nothing trained after truncation) or a text document
EMPTY_ROW = {"kind": "example", "number": 0, "location": "", "unit": "line", "parsed": True, "error": "", "split": 0,
             "truncated": False, "input_ids": [], "labels": []}


def default_cache_dir() -> Path:
    root = os.environ.get("LMDISTILL_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "lmdistill" / "data"


# -- the key --------------------------------------------------------------------------------------------------
def tokenizer_digest(tokenizer) -> str:
    """A checksum of what tokenizes: the backend's serialized model (vocabulary, merges, normalizer, added
    tokens), the special tokens and the chat template."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(chat_template(tokenizer).encode())
    return h.hexdigest()


def store_key(path: str | Path, tokenizer, max_seq_len: int, data_format: str, skip_bad_records: bool) -> str:
    inputs = {"version": STORE_VERSION, "file": file_digest(path, with_mtime=True), "tokenizer": tokenizer_digest(tokenizer),
              "max_seq_len": max_seq_len, "format": normalize_format(data_format), "skip": bool(skip_bad_records)}
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=12).hexdigest()


# -- reading --------------------------------------------------------------------------------------------------
class StoredExamples(Sequence):
    """The examples of a store: `examples[i]` -> `{"input_ids": [...], "labels": [...]}`, read-only, `.stats`,
    `.lengths` (tokens per example, numpy), `.folder`."""

    def __init__(self, folder: Path):
        import datasets

        self.folder = Path(folder)
        self.table = datasets.load_from_disk(str(self.folder / "rows"))
        self.index = np.load(self.folder / "index.npy", mmap_mode="r")
        self.lengths = np.load(self.folder / "lengths.npy", mmap_mode="r")
        self.stats = DataStats(**json.loads((self.folder / "stats.json").read_text()))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        row = self.table[int(self.index[i])]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def __repr__(self) -> str:
        return f"StoredExamples({len(self):,} examples at {self.folder})"


# -- building -------------------------------------------------------------------------------------------------
def open_or_build(path: str | Path, tokenizer, max_seq_len: int, data_format: str = "auto",
                  skip_bad_records: bool = False, num_proc: int | None = None,
                  cache_dir: str | Path | None = None) -> StoredExamples:
    """The store of these inputs: opened when it exists, else built (one process per store at a time: the others
    wait on its lock, then open what it built)."""
    import fcntl

    if max_seq_len < 2:
        raise LmdistillError(f"max_seq_len must be at least 2, found {max_seq_len}.")
    check_readable(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = store_key(path, tokenizer, max_seq_len, data_format, skip_bad_records)
    folder = root / key
    if (folder / "stats.json").is_file():
        return StoredExamples(folder)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds this store
        if not (folder / "stats.json").is_file():
            _build(Path(path), tokenizer, max_seq_len, data_format, skip_bad_records, num_proc, folder)
    return StoredExamples(folder)


def _build(path: Path, tokenizer, max_seq_len: int, data_format: str, skip_bad_records: bool, num_proc,
           folder: Path) -> None:
    import datasets

    stats = DataStats(source=str(path), data_format=normalize_format(data_format), max_seq_len=max_seq_len)
    if next(iter_raw_records(path), None) is None:
        raise LmdistillError(f"{path}: empty file: no records found.")
    fmt, detected_at = _detect(path, stats.data_format)
    shards = _shards(path, num_proc)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the caller prints what was built
    advice = "Free space or point --data_cache at a larger disk, then run the same command again."
    try:
        with guarded_write(tmp, "the tokenized store", folder.parent, "no store was left behind", advice):
            kwargs = {"path": str(path), "tokenizer": tokenizer, "max_seq_len": max_seq_len, "fmt": fmt}
            procs = max(1, min(len(shards), _cores(num_proc)))
            rows = datasets.Dataset.from_generator(
                _rows, gen_kwargs={**kwargs, "shards": shards}, num_proc=procs if procs > 1 else None,
                cache_dir=str(tmp / "gen"), features=_features())
            _finish(rows, stats, fmt, detected_at, skip_bad_records, max_seq_len, tmp)
            del rows
            shutil.rmtree(tmp / "gen", ignore_errors=True)
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if shown:
            datasets.enable_progress_bars()


def _cores(num_proc: int | None) -> int:
    return num_proc if num_proc else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                                      os.cpu_count() or 1)


def _features():
    import datasets

    return datasets.Features({
        "kind": datasets.Value("string"), "number": datasets.Value("int64"), "location": datasets.Value("string"),
        "unit": datasets.Value("string"), "parsed": datasets.Value("bool"), "error": datasets.Value("string"), "split": datasets.Value("int32"), "truncated": datasets.Value("bool"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
    })


def _detect(path: Path, data_format: str) -> tuple[str, str | None]:
    """The file's format: given, or the first record of a valid shape's (and where it was found)."""
    if data_format != "auto":
        return data_format, None
    for raw in iter_raw_records(path):
        if raw.error is None:
            try:
                fmt = detect_format(raw.record)
                parse_record(raw.record, fmt)
                return fmt, raw.location
            except LmdistillError:
                continue
    return "auto", None  # no usable record: every row reports its own error


def _shards(path: Path, num_proc: int | None) -> list[tuple]:
    """For JSONL, (first line number, byte offset, line count) ranges at line boundaries, a few per process (two
    passes: count the lines, then note the offsets of the boundaries); for other files one shard (one process)."""
    if path.is_dir() or path.suffix not in (".jsonl", ".ndjson"):
        return [(None, None, None)]
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    procs = max(1, min(_cores(num_proc), lines // RECORDS_PER_PROCESS))
    n = procs * SHARDS_PER_PROCESS if procs > 1 else 1
    size = max(1, -(-lines // n))
    firsts = set(range(1, lines + 1, size))
    shards, offset = [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number in firsts:
                shards.append((number, offset, min(size, lines - number + 1)))
            offset += len(raw)
    return shards or [(1, 0, 0)]


def _raw_in_shard(path: str, shard: tuple) -> Iterator:
    first, offset, count = shard
    if first is None:
        yield from iter_raw_records(path)
        return
    from lmdistill.data.readers import read_jsonl_lines

    yield from read_jsonl_lines(path, offset, first, count)


def _rows(shards: list, path: str, tokenizer, max_seq_len: int, fmt: str) -> Iterator[dict]:
    """The rows of some shards: one per example (or text document), and one per bad or dropped record/sequence."""
    for shard in shards:
        for raw in _raw_in_shard(path, shard):
            base = {**EMPTY_ROW, "number": raw.number}  # where and how it was read: only a bad record's row says
            try:
                if raw.error is not None:
                    raise LmdistillError(raw.error)
                parsed = parse_record(raw.record, fmt if fmt != "auto" else detect_format(raw.record))
                if isinstance(parsed, str):
                    yield {**base, "kind": "doc", "input_ids": _document(tokenizer, parsed)}
                    continue
                sequences = render_conversation_examples(tokenizer, parsed)
            except LmdistillError as exc:
                yield {**base, "kind": "bad", "error": str(exc), "location": raw.location, "unit": raw.unit,
                       "parsed": raw.error is None}
                continue
            for k, (ids, labels) in enumerate(sequences):
                cut = len(ids) > max_seq_len
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                kind = "dropped" if all(x == IGNORE_INDEX for x in labels[1:]) else "example"
                yield {**base, "kind": kind, "split": int(k > 0), "truncated": cut, "input_ids": ids, "labels": labels}


def _document(tokenizer, text: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmdistillError("the tokenizer has no eos token, needed to separate plain-text documents.")
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [eos]


def _column(rows, name: str) -> np.ndarray:
    return np.asarray(rows.with_format("numpy")[name]) if len(rows) else np.array([])


def _finish(rows, stats: DataStats, fmt: str, detected_at: str | None, skip_bad_records: bool, max_seq_len: int,
            tmp: Path) -> None:
    """Counts, the first bad record (raised unless skipped), text blocks, and the store's files in `tmp`."""
    import pyarrow.compute as pc

    kind, number = _column(rows, "kind"), _column(rows, "number")
    stats.data_format = fmt if fmt != "auto" else stats.data_format
    stats.records = len(np.unique(number))
    bad = np.nonzero(kind == "bad")[0]
    if len(bad) and not skip_bad_records:
        first = rows[int(bad[0])]
        shaped = first["parsed"] and detected_at not in (None, first["location"])
        note = f" The file's format '{fmt}' was detected from {detected_at}." if shaped else ""
        raise LmdistillError(f"{first['location']}: {first['error']}{note} (skip_bad_records / --skip_bad_records "
                             "skips bad records instead.)")
    for i in bad:
        row = rows[int(i)]
        stats.add_bad(row["number"], row["unit"])
    if stats.records == 0:
        raise LmdistillError(f"{stats.source}: empty file: no records found.")
    if (kind == "doc").any():
        rows = _pack_text(rows, kind, max_seq_len, tmp)
        kind = _column(rows, "kind")
    sequences = (kind == "example") | (kind == "dropped")
    stats.split_sequences += int(_column(rows, "split")[sequences].sum())
    stats.truncated += int(_column(rows, "truncated")[sequences].sum())
    stats.dropped_no_trained += int((kind == "dropped").sum())
    index = np.nonzero(kind == "example")[0].astype(np.int64)
    examples = rows.select_columns(["input_ids", "labels"])
    lengths, trained = np.zeros(len(index), dtype=np.int32), 0
    for start in range(0, len(index), 8192):
        part = examples.select(index[start:start + 8192]).with_format("arrow")[:]
        lengths[start:start + part.num_rows] = pc.list_value_length(part.column("input_ids")).to_numpy()
        labels = pc.list_flatten(part.column("labels"))
        trained += int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
    stats.examples, stats.tokens, stats.trained_tokens = len(index), int(lengths.sum()), trained
    check_trainable(stats)
    examples.save_to_disk(str(tmp / "rows"))
    np.save(tmp / "index.npy", index)
    np.save(tmp / "lengths.npy", lengths)
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)) + "\n")


def _pack_text(rows, kind: np.ndarray, block: int, tmp: Path):
    """Plain-text documents (each ids + EOS) -> one token stream -> blocks of `block` tokens, every token trained
    (as `lmdistill.data.loader._TextPacker`); the last, shorter block is kept unless it has a single token."""
    import datasets

    docs = np.nonzero(kind == "doc")[0]

    def blocks():
        buffer: list[int] = []
        for start in range(0, len(docs), 1024):
            for ids in rows.select(docs[start:start + 1024])["input_ids"]:
                buffer += ids
                cut = len(buffer) - len(buffer) % block
                for k in range(0, cut, block):
                    yield _block(buffer[k:k + block])
                del buffer[:cut]
        if buffer:
            yield _block(buffer)

    others = rows.select(np.nonzero(kind != "doc")[0])
    packed = datasets.Dataset.from_generator(blocks, cache_dir=str(tmp / "gen" / "text"), features=_features())
    return datasets.concatenate_datasets([others, packed]) if len(others) else packed


def _block(ids: list[int]) -> dict:
    return {**EMPTY_ROW, "kind": "dropped" if len(ids) < 2 else "example", "input_ids": list(ids), "labels": list(ids)}
