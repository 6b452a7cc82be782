"""Every bad-input path: the error names the file, the line (or record index) and what is wrong."""

from __future__ import annotations

import json
import re

import pytest

from lmdistill.data import load_examples, read_records
from lmdistill.errors import LmdistillError
from lmdistill.tokenizer import train_tokenizer

GOOD = {"instruction": "hi", "output": "hello"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=300, texts=["hello world instruction output"] * 10)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def error_of(path, tok, **kwargs) -> str:
    with pytest.raises(LmdistillError) as info:
        load_examples(path, tok, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("bad_line, expected", [
    ('{"instruction": "hi", "output": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"instruction": "hi"}', "missing field 'output'"),
    ('{"instruction": "hi", "output": ["a", "b"]}', "field 'output' must be a str, found list"),
    ('{"instruction": "hi", "output": "x", "history": [["one"]]}', r"history\[0\]: expected a \[user, assistant\]"),
    ('{"foo": 1, "bar": 2}', "missing field 'instruction'"),
])
def test_bad_jsonl_line_names_file_line_and_problem(tmp_path, tok, bad_line, expected):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "", bad_line])
    message = error_of(path, tok)
    assert message.startswith(f"{path}:3: ")  # the blank line 2 still counts in line numbers
    assert re.search(expected, message)


def test_unknown_shape_lists_the_accepted_shapes(tmp_path, tok):
    message = error_of(write_lines(tmp_path / "d.jsonl", ['{"question": "q", "answer": "a"}']), tok)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:1: unknown record shape (fields: ['answer', 'question'])")
    for shape in ("minimind", "sharegpt", "alpaca", "prompt_completion", "guanaco", "text"):
        assert shape in message


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"role": "robot", "content": "x"}]}, "role must be one of system, user, assistant"),
    ({"conversations": [{"role": "user"}]}, r"conversations\[0\]: missing field 'content'"),
    ({"conversations": [{"role": "user", "content": "q"}]}, "without any assistant turn"),
    ({"conversations": []}, "non-empty list"),
    ({"conversations": [{"role": "user", "content": "q", "reasoning_content": "r"}]}, "only allowed on assistant"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "'from' must be one of"),
    ({"conversations": [{"from": "human"}]}, "missing field 'value'"),
    ({"text": "   "}, "field 'text' is empty"),
])
def test_bad_record_shapes(tmp_path, tok, record, expected):
    message = error_of(write_lines(tmp_path / "d.jsonl", [json.dumps(record)]), tok)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:1: ") and re.search(expected, message), message


def test_json_list_errors_name_the_record_index(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, GOOD, "oops"]), encoding="utf-8")
    assert error_of(path, tok).startswith(f"{path}[record 2]: expected a JSON object")
    path.write_text('[{"instruction": "hi",\n "output": }]', encoding="utf-8")
    assert error_of(path, tok).startswith(f"{path}:2: invalid JSON")


def test_later_record_of_another_shape_names_where_the_format_came_from(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({"prompt": "p", "completion": "c"})])
    message = error_of(path, tok)
    assert message.startswith(f"{path}:2: missing field 'instruction'")
    assert f"format 'alpaca' was detected from {path}:1" in message


def test_explicit_guanaco_without_markers(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "just prose"})])
    assert "without any '### Assistant:' turn" in error_of(path, tok, data_format="guanaco")


def test_invalid_utf8_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    assert error_of(path, tok).startswith(f"{path}:2: expected UTF-8 text")


def test_skip_bad_records_counts_and_reports_first_lines(tmp_path, tok):
    lines = [json.dumps(GOOD)] + ["{broken"] * 12 + [json.dumps(GOOD)]
    examples = load_examples(write_lines(tmp_path / "d.jsonl", lines), tok, skip_bad_records=True)
    stats = examples.stats
    assert (stats.records, stats.examples, stats.bad_records) == (14, 2, 12)
    assert stats.bad_record_lines == list(range(2, 12))
    assert "12 bad records skipped (lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ...)" in stats.summary()


def test_skip_bad_records_with_bad_first_records_detects_from_the_next(tmp_path, tok):
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write_lines(tmp_path / "d.jsonl", ['{"nope": 1}', '{"instruction": "no output"}', json.dumps(sharegpt)])
    examples = load_examples(path, tok, skip_bad_records=True)
    assert (examples.stats.data_format, examples.stats.bad_record_lines) == ("sharegpt", [1, 2])


@pytest.mark.parametrize("name, content", [("d.jsonl", ""), ("d.jsonl", "\n\n"), ("d.json", "[]"), ("d.txt", "")])
def test_empty_file_is_an_error(tmp_path, tok, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert "empty file" in error_of(tmp_path / name, tok)


def test_all_bad_records_is_an_error(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", ["{broken", "{broken"])
    assert "no usable record: all 2 records are bad (lines 1, 2)" in error_of(path, tok, skip_bad_records=True)


def test_nothing_trainable_is_an_error(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"instruction": "hello world " * 20, "output": "x"})])
    message = error_of(path, tok, max_seq_len=8)
    assert "no trainable token" in message and "1 dropped" in message


def test_bad_paths_and_options(tmp_path, tok):
    assert "not found" in error_of(tmp_path / "missing.jsonl", tok)
    (tmp_path / "d.csv").write_text("a,b\n", encoding="utf-8")
    assert "unsupported file type '.csv'" in error_of(tmp_path / "d.csv", tok)
    (tmp_path / "folder").mkdir()
    assert "not one written by `datasets`" in error_of(tmp_path / "folder", tok)
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)])
    assert "data_format must be 'auto' or one of" in error_of(path, tok, data_format="csv")
    assert "max_seq_len must be at least 2" in error_of(path, tok, max_seq_len=1)


def test_read_records_raises_on_a_malformed_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "{broken"])
    records = read_records(path)
    assert next(records) == (f"{path}:1", GOOD)
    with pytest.raises(LmdistillError, match=re.escape(f"{path}:2: invalid JSON")):
        next(records)
