"""load_examples on every format: masks, truncation counts, text packing, file types, pad_batch, shared data."""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.data import IGNORE_INDEX, load_examples, pad_batch, read_records
from lmdistill.tokenizer import train_tokenizer

CORPUS = ["hello world, how are you today? I am fine, thank you.", "你好，今天天气很好。我们去公园吧！",
          "Human Assistant instruction output prompt completion"] * 20
EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=400, texts=CORPUS)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def trained_runs(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive trained tokens of one example (labels == ids where trained)."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


FORMAT_CASES = {
    "minimind": ({"conversations": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello", "reasoning_content": "think"},
                                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "fine"}]},
                 ["<think>\nthink\n</think>\n\nhello" + EOT, "fine" + EOT]),
    "messages": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                 ["yo" + EOT]),
    "alpaca": ({"instruction": "say hi", "input": "to Bob", "output": "hi Bob", "system": "be nice",
                "history": [["first q", "first a"]]}, ["first a" + EOT, "hi Bob" + EOT]),
    "sharegpt": ({"system": "sys", "conversations": [
                     {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                     {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
                 ["a1" + EOT, "a2" + EOT]),
    "prompt_completion": ({"prompt": "2+2?", "completion": "4"}, ["4" + EOT]),
    "guanaco": ({"text": "### Human: hi there### Assistant: hello!### Human: bye ### Assistant: see you"},
                ["hello!" + EOT, "see you" + EOT]),
}


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_every_conversation_format_trains_exactly_the_replies(tmp_path, tok, name):
    record, expected = FORMAT_CASES[name]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [record, record]), tok)
    assert len(examples) == 2
    assert trained_runs(tok, examples[0]) == expected
    stats = examples.stats
    assert stats.data_format == ("minimind" if name == "messages" else name)
    assert (stats.records, stats.examples, stats.truncated, stats.bad_records) == (2, 2, 0, 0)
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.trained_tokens == sum(l != IGNORE_INDEX for e in examples for l in e["labels"])


def test_prompt_completion_with_message_lists(tmp_path, tok):
    record = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), tok)
    assert trained_runs(tok, examples[0]) == ["a" + EOT]


def test_explicit_format_overrides_detection(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "### Human: hi ### Assistant: yo"}])
    assert load_examples(path, tok).stats.data_format == "guanaco"
    plain = load_examples(path, tok, data_format="text")
    assert plain[0]["labels"] == plain[0]["input_ids"]  # pretraining text: every token trained


def test_plain_text_is_packed_with_eos_into_blocks(tmp_path, tok):
    docs = ["hello world " * 7, "你好，今天天气很好。", "The quick brown fox."]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs]), tok, max_seq_len=16)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [t for e in examples for t in e["input_ids"]] == stream
    assert all(len(e["input_ids"]) == 16 for e in examples[:-1]) and 2 <= len(examples[-1]["input_ids"]) <= 16
    assert all(e["labels"] == e["input_ids"] for e in examples)
    stats = examples.stats
    assert (stats.data_format, stats.records, stats.examples, stats.tokens, stats.trained_tokens) == \
        ("text", 3, len(examples), len(stream), len(stream))
    assert "block" in stats.summary()


def test_txt_file_is_one_document(tmp_path, tok):
    path = tmp_path / "book.txt"
    path.write_text("hello world\n\nhow are you today?\n", encoding="utf-8")
    examples = load_examples(path, tok, max_seq_len=8)
    ids = [t for e in examples for t in e["input_ids"]]
    assert ids == tok(path.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(read_records(path)) == [(f"{path}:1", {"text": path.read_text()})]


def test_truncation_and_dropped_counts(tmp_path, tok):
    long_reply = "hello world " * 30
    records = [
        {"instruction": "hi", "output": long_reply},  # reply cut: truncated, kept
        {"instruction": "hello world " * 40, "output": "fine"},  # reply cut away entirely: dropped
        {"instruction": "hi", "output": "fine"},  # fits
    ]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", records), tok, max_seq_len=32)
    stats = examples.stats
    assert (stats.records, stats.examples, stats.truncated, stats.dropped_no_trained) == (3, 2, 2, 1)
    assert all(len(e["input_ids"]) <= 32 for e in examples)
    assert trained_runs(tok, examples[1]) == ["fine" + EOT]
    summary = stats.summary()
    assert "2 truncated" in summary and "1 dropped because no trained token survived truncation" in summary


def test_json_list_parquet_and_datasets_folder(tmp_path, tok):
    import datasets

    records = [{"instruction": "say hi", "input": "", "output": "hi"},
               {"instruction": "q", "input": "x", "output": "a"}]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("d.json", "d.parquet", "saved", "saved_dict"):
        examples = load_examples(tmp_path / name, tok)
        assert [trained_runs(tok, e) for e in examples] == [["hi" + EOT], ["a" + EOT]], name
    locations = [location for location, _ in read_records(tmp_path / "d.json")]
    assert locations == [f"{tmp_path / 'd.json'}[record {i}]" for i in (0, 1)]


def test_json_file_holding_json_lines(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.json", [{"prompt": "a", "completion": "b"}] * 3)
    assert len(load_examples(path, tok)) == 3


def test_pad_batch_right_pads(tok):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = pad_batch(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


# --- real data (skipped when ../shared/data is absent) ---------------------------------------------------------

def test_kdconv_with_minimind_tokenizer(tmp_path, minimind_tokenizer):
    from conftest import shared_file

    lines = shared_file("kdconv_zh_dialogs.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    path = tmp_path / "kd.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples = load_examples(path, minimind_tokenizer, max_seq_len=4096)
    assert examples.stats.records == examples.stats.examples == 30 and examples.stats.truncated == 0
    for line, example in zip(lines, examples):
        replies = [m["content"] + EOT for m in json.loads(line)["conversations"] if m["role"] == "assistant"]
        assert trained_runs(minimind_tokenizer, example) == replies


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_alpaca_demo_files(minimind_tokenizer, name):
    from conftest import shared_file

    path = shared_file(name)
    examples = load_examples(path, minimind_tokenizer, max_seq_len=512)
    stats = examples.stats
    assert stats.records == len(json.loads(path.read_text(encoding="utf-8")))
    assert stats.examples + stats.dropped_no_trained == stats.records and stats.bad_records == 0
    outputs = [r["output"] for _, r in read_records(path)]
    short = [(e, o) for e, o in zip(examples, outputs) if len(e["input_ids"]) < 512][:50]
    assert all(trained_runs(minimind_tokenizer, e) == [o + EOT] for e, o in short)


def test_tinyshakespeare_packs(minimind_tokenizer):
    from conftest import shared_file

    examples = load_examples(shared_file("tinyshakespeare.txt"), minimind_tokenizer, max_seq_len=256)
    assert examples.stats.records == 1 and examples.stats.trained_tokens == examples.stats.tokens
    assert all(len(e["input_ids"]) == 256 for e in examples[:-1])
    assert examples[-1]["input_ids"][-1] == minimind_tokenizer.eos_token_id
