"""`lmdistill data`: counts and examples with trained spans marked; a bad file is one paragraph, exit 1."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from lmdistill.cli import main
from lmdistill.data.cli import show_example
from lmdistill.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(vocab_size=300, texts=["hello world, how are you? fine thanks"] * 10, output_dir=path)
    return path


@pytest.fixture()
def data_file(tmp_path):
    records = [{"conversations": [{"role": "user", "content": "how are you?"},
                                  {"role": "assistant", "content": "fine thanks"}]}] * 3
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_prints_counts_and_bracketed_examples(capsys, tokenizer_dir, data_file):
    assert main(["data", "--data", str(data_file), "--tokenizer", str(tokenizer_dir), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 records read -> 3 examples" in out and "0 truncated" in out
    assert out.count("[[fine thanks<|im_end|>]]") == 2
    assert "<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n[[" in out


def test_terminal_output_uses_colours_not_brackets(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer("hi fine", add_special_tokens=False)["input_ids"]
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="standard")
    show_example(console, tokenizer, {"input_ids": ids, "labels": [-100] + ids[1:]})
    out = buffer.getvalue()
    assert "\x1b[" in out and "[[" not in out and "fine" in out


def test_bad_file_is_one_paragraph_and_exit_1(capsys, tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": \n', encoding="utf-8")
    assert main(["data", "--data", str(path), "--tokenizer", str(tokenizer_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmdistill data: error: {path}:2: invalid JSON") and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert main(["data", "--data", str(path), "--tokenizer", str(tokenizer_dir), "--skip_bad_records"]) == 0
    assert "1 bad record skipped (lines 2)" in capsys.readouterr().out


def test_missing_tokenizer_folder(capsys, data_file, tmp_path):
    assert main(["data", "--data", str(data_file), "--tokenizer", str(tmp_path / "none")]) == 1
    assert "expected a tokenizer folder" in capsys.readouterr().err
