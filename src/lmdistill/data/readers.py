"""Files -> records: JSONL, JSON lists, parquet, HF `datasets` folders (`save_to_disk`) and .txt.

Every record comes with its location, so that an error can say where it is: `file.jsonl:12` (1-based line),
`file.json[record 3]` / `file.parquet[record 3]` / `folder[record 3]` (0-based index, as in the list),
`file.txt:1` (a .txt file is one document). A line that is not valid JSON is yielded as a `RawRecord` with an
`error`, so the caller decides whether it is fatal (the default) or skipped (`skip_bad_records`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lmdistill.errors import LmdistillError

SUPPORTED_FILES = ".jsonl/.ndjson (one JSON object a line), .json (a JSON list, or JSON lines), .parquet, .txt, " \
    "or a folder written by `datasets.Dataset.save_to_disk`"


@dataclass
class RawRecord:
    """One record as read from a file: `record` is a dict, or None when `error` says why it is unusable."""

    path: str
    number: int  # 1-based line for JSONL/.txt, 0-based record index for lists, parquet and datasets
    unit: str  # "line" or "record"
    record: dict[str, Any] | None
    error: str | None = None

    @property
    def location(self) -> str:
        return f"{self.path}:{self.number}" if self.unit == "line" else f"{self.path}[record {self.number}]"


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(location, record)` for every record of a supported file; a malformed one raises LmdistillError.

    The record is a plain dict whose shape is not checked here (see `lmdistill.data.formats`).
    """
    for raw in iter_raw_records(path):
        if raw.error is not None:
            raise LmdistillError(f"{raw.location}: {raw.error}")
        yield raw.location, raw.record


def check_data_path(path: str | Path, flag: str = "--data") -> None:
    """A clear error, before anything is read, unless `path` is a supported data file or a datasets folder."""
    path = Path(path)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise LmdistillError(f"{flag}: '{path}' is a folder, but not one written by `datasets` save_to_disk. "
                                 f"Expected {SUPPORTED_FILES}.")
    elif not path.is_file():
        raise LmdistillError(f"{flag}: no such file '{path}'. Expected {SUPPORTED_FILES}.")
    elif path.suffix not in (".jsonl", ".ndjson", ".json", ".parquet", ".txt"):
        raise LmdistillError(f"{flag}: '{path}' has the unsupported file type '{path.suffix}'. Expected {SUPPORTED_FILES}.")


def check_readable(path: str | Path) -> None:
    """The error `iter_raw_records` would raise before its first record: no such file, or an unsupported type."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.is_file():
        raise LmdistillError(f"data file '{path}' not found. Expected {SUPPORTED_FILES}.")
    if path.suffix not in (".jsonl", ".ndjson", ".json", ".parquet", ".txt"):
        raise LmdistillError(f"{path}: unsupported file type '{path.suffix}'. Expected {SUPPORTED_FILES}.")


def iter_raw_records(path: str | Path) -> Iterator[RawRecord]:
    """Yield every record of `path` as a `RawRecord`, malformed ones included (with `error` set)."""
    path = Path(path)
    check_readable(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
    elif path.suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        text = _read_text(path)
        if text.strip():  # an empty .txt has no record: the caller reports an empty file
            yield RawRecord(str(path), 1, "line", {"text": text})


def _json_error(exc) -> str:
    """'Expecting value at column 10'; json's own messages may end in 'at' ('Unterminated string starting at')."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmdistillError(f"{path}: expected UTF-8 text, found invalid bytes at byte {exc.start}.") from None


def _as_record(value: Any) -> tuple[dict | None, str | None]:
    if isinstance(value, dict):
        return value, None
    return None, f"expected a JSON object ({{...}}), found {type(value).__name__}: {_preview(value)}"


def _preview(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    """One JSON object a line; blank lines are not records and are passed over."""
    yield from read_jsonl_lines(path)


def read_jsonl_lines(path: str | Path, offset: int = 0, first: int = 1, count: int | None = None
                      ) -> Iterator[RawRecord]:
    """The records of `count` lines (all when None) starting at byte `offset`, which is line number `first` (a
    shard of a JSONL file: `lmdistill.data.store`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for number, raw in enumerate(f, start=first):
            if count is not None and number >= first + count:
                break
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                record, error = _as_record(json.loads(line))
            except UnicodeDecodeError as exc:
                record, error = None, f"expected UTF-8 text, found invalid bytes at column {exc.start + 1}"
            except json.JSONDecodeError as exc:
                record, error = None, f"invalid JSON ({_json_error(exc)}): {_preview(line.strip())}"
            yield RawRecord(str(path), number, "line", record, error)


def _read_json(path: Path) -> Iterator[RawRecord]:
    """A JSON list of objects; a .json file that holds JSON lines instead is read as JSONL."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: JSON lines saved as .json
            yield from _read_jsonl(path)
            return
        raise LmdistillError(f"{path}:{exc.lineno}: invalid JSON ({_json_error(exc)}).") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise LmdistillError(f"{path}: expected a JSON list of records, found a JSON {type(data).__name__}.")
    for index, value in enumerate(data):
        record, error = _as_record(value)
        yield RawRecord(str(path), index, "record", record, error)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise LmdistillError(f"{path}: not a readable parquet file ({exc}).") from None
    index = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRecord(str(path), index, "record", row)
            index += 1


def _read_saved_dataset(path: Path) -> Iterator[RawRecord]:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict from which the 'train' (or only) split is read."""
    import datasets

    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise LmdistillError(f"{path}: a folder, but not one written by `datasets` save_to_disk. "
                             f"Expected {SUPPORTED_FILES}.")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if "train" not in splits and len(splits) != 1:
            raise LmdistillError(f"{path}: expected a 'train' split or a single split, found splits {splits}.")
        dataset = dataset["train" if "train" in splits else splits[0]]
    for index, row in enumerate(dataset):
        yield RawRecord(str(path), index, "record", dict(row))
