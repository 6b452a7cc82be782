"""The tokenized store: exactly the examples the in-memory loader makes (ids, labels, order, counts), built once per
set of inputs with several processes, never stale, never half-built, shared by processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data import store as store_module
from lmdistill.data.store import StoredExamples, open_or_build, store_key
from lmdistill.errors import LmdistillError

from conftest import shared_file


def _same(a, b) -> None:
    assert len(a) == len(b) and all(a[i] == b[i] for i in range(len(a)))
    assert dataclasses.asdict(a.stats) == dataclasses.asdict(b.stats)


def _formats(tmp_path) -> dict[str, Path]:
    """One small file per record shape (and file type)."""
    files = {}
    turns = [{"role": "user", "content": f"question {i}"} if i % 2 == 0 else
             {"role": "assistant", "content": f"answer number {i}"} for i in range(4)]
    rows = {
        "minimind.jsonl": [{"conversations": turns} for _ in range(5)],
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"ok {i}"}]}
                           for i in range(5)],
        "alpaca.json": [{"instruction": f"do {i}", "input": "", "output": f"done {i}"} for i in range(5)],
        "prompt_completion.jsonl": [{"prompt": f"p {i}", "completion": f"c {i}"} for i in range(5)],
        "guanaco.jsonl": [{"text": f"### Human: q {i} ### Assistant: a {i}"} for i in range(5)],
        "text.jsonl": [{"text": "a long document " * (5 + i)} for i in range(5)],
    }
    for name, records in rows.items():
        path = tmp_path / name
        text = json.dumps(records) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in records)
        path.write_text(text)
        files[name] = path
    (tmp_path / "doc.txt").write_text("plain text " * 40)
    files["doc.txt"] = tmp_path / "doc.txt"
    return files


@pytest.mark.parametrize("max_seq_len", [12, 40, 200])
def test_the_store_gives_exactly_the_loaders_examples_in_every_format(tiny_tokenizer_dir, tmp_path, max_seq_len):
    """Short rows (truncation, dropped examples, or nothing trainable at all: the same error) and long ones."""
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    for name, path in _formats(tmp_path).items():
        try:
            reference = tokenize_examples(path, tok, max_seq_len)
        except LmdistillError as exc:
            with pytest.raises(LmdistillError) as stored:
                open_or_build(path, tok, max_seq_len, cache_dir=tmp_path / "c")
            assert str(stored.value) == str(exc), name
            continue
        _same(reference, open_or_build(path, tok, max_seq_len, cache_dir=tmp_path / "c"))


@pytest.mark.parametrize("name,fmt", [("kdconv_zh_dialogs.jsonl", "auto"), ("alpaca_zh_demo.json", "auto"),
                                      ("alpaca_en_demo.json", "alpaca"), ("tinyshakespeare.txt", "auto")])
def test_the_store_equals_the_loader_on_shared_data_with_two_processes(name, fmt, minimind_tokenizer, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(store_module, "RECORDS_PER_PROCESS", 50)  # so a few hundred records take 2 processes
    path = shared_file(name)
    reference = tokenize_examples(path, minimind_tokenizer, 256, fmt)
    _same(reference, open_or_build(path, minimind_tokenizer, 256, fmt, num_proc=2, cache_dir=tmp_path / "two"))
    _same(reference, open_or_build(path, minimind_tokenizer, 256, fmt, num_proc=1, cache_dir=tmp_path / "one"))


def test_bad_records_raise_or_are_counted_as_the_loader_does(tiny_tokenizer_dir, tmp_path, monkeypatch):
    from lmdistill.tokenizer import load_tokenizer

    monkeypatch.setattr(store_module, "RECORDS_PER_PROCESS", 2)
    tok = load_tokenizer(tiny_tokenizer_dir)
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    path.write_text("\n".join([good, good, "{not json", good, json.dumps({"conversations": []}), good] * 2) + "\n")
    with pytest.raises(LmdistillError) as serial:
        tokenize_examples(path, tok, 32)
    with pytest.raises(LmdistillError) as stored:
        open_or_build(path, tok, 32, num_proc=2, cache_dir=tmp_path / "c")
    assert str(stored.value) == str(serial.value) and f"{path}:3: invalid JSON" in str(stored.value)
    _same(tokenize_examples(path, tok, 32, skip_bad_records=True),
          open_or_build(path, tok, 32, skip_bad_records=True, num_proc=2, cache_dir=tmp_path / "c"))


def test_changed_inputs_make_a_new_store_and_the_same_inputs_reopen_it(tiny_tokenizer_dir, tiny_chat, tmp_path):
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text(tiny_chat.read_text())
    cache = tmp_path / "cache"
    first = open_or_build(data, tok, 48, cache_dir=cache)
    assert open_or_build(data, tok, 48, cache_dir=cache).folder == first.folder  # opened, not built again
    keys = {store_key(data, tok, 48, "auto", False)}
    keys.add(store_key(data, tok, 32, "auto", False))  # max_seq_len
    keys.add(store_key(data, tok, 48, "minimind", False))  # format
    keys.add(store_key(data, tok, 48, "auto", True))  # skip_bad_records
    templated = load_tokenizer(tiny_tokenizer_dir)
    templated.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    keys.add(store_key(data, templated, 48, "auto", False))  # chat template
    other = load_tokenizer(tiny_tokenizer_dir)
    other.add_tokens(["<new-token>"])
    keys.add(store_key(data, other, 48, "auto", False))  # the tokenizer
    assert len(keys) == 6
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer, same path
    changed = open_or_build(data, tok, 48, cache_dir=cache)
    assert changed.folder != first.folder and len(changed) < len(first)
    _same(tokenize_examples(data, tok, 48), changed)


def test_a_build_killed_half_way_leaves_nothing_a_later_run_uses(tiny_tokenizer_dir, tiny_chat, tmp_path,
                                                                 monkeypatch):
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    cache = tmp_path / "cache"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        open_or_build(tiny_chat, tok, 48, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    key = store_key(tiny_chat, tok, 48, "auto", False)
    (cache / f".{key}.tmp-99999").mkdir()  # what a SIGKILLed build leaves: never opened
    (cache / f".{key}.tmp-99999" / "index.npy").write_bytes(b"partial")
    _same(tokenize_examples(tiny_chat, tok, 48), open_or_build(tiny_chat, tok, 48, cache_dir=cache))


RANK = """
import os, sys, json
import lmdistill.data.store as store
from lmdistill.tokenizer import load_tokenizer
built = []
real = store._build
def counting(*args, **kwargs):
    built.append(os.getpid())
    return real(*args, **kwargs)
store._build = counting
examples = store.open_or_build(sys.argv[1], load_tokenizer(sys.argv[2]), 48, cache_dir=sys.argv[3])
rank, world = int(sys.argv[4]), 2
mine = [examples[i]["input_ids"][:3] for i in range(rank, len(examples), world)]
print(json.dumps({"built": len(built), "n": len(examples), "mine": len(mine)}))
"""


def test_two_processes_build_once_and_read_their_own_slices(tiny_tokenizer_dir, tiny_chat, tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tiny_chat), str(tiny_tokenizer_dir), str(cache), str(r)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in procs]
    assert sum(r["built"] for r in results) == 1  # one built, the other waited on the lock and opened it
    assert results[0]["n"] == results[1]["n"] and results[0]["mine"] + results[1]["mine"] == results[0]["n"]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_load_examples_reads_through_the_store_and_prepare_prints_it(tiny_tokenizer_dir, tiny_chat, tmp_path, capsys):
    from lmdistill.cli import main
    from lmdistill.tokenizer import load_tokenizer

    examples = load_examples(tiny_chat, load_tokenizer(tiny_tokenizer_dir), 48, cache_dir=tmp_path / "c")
    assert isinstance(examples, StoredExamples) and examples[-1] == examples[len(examples) - 1]
    with pytest.raises(TypeError):
        examples[0] = {}  # read-only
    assert main(["data", "--data", str(tiny_chat), "--tokenizer", str(tiny_tokenizer_dir), "--max_seq_len", "48",
                 "--prepare", "--data_cache", str(tmp_path / "c"), "--num_proc", "1"]) == 0
    out = capsys.readouterr().out
    assert f"store: {examples.folder} (" in out and f"{len(examples):,} examples" in out


def test_a_store_that_cannot_be_written_says_so_and_leaves_nothing(tiny_tokenizer_dir, tiny_chat, tmp_path,
                                                                  monkeypatch):
    import errno

    import datasets

    from lmdistill.errors import DiskWriteError
    from lmdistill.tokenizer import load_tokenizer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    cache = tmp_path / "cache"
    with pytest.raises(DiskWriteError, match="writing the tokenized store .* no space left on the device"):
        open_or_build(tiny_chat, load_tokenizer(tiny_tokenizer_dir), 48, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_a_large_file_is_identified_by_sampled_blocks(tmp_path, monkeypatch):
    from lmdistill.data import identity

    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(identity, "SAMPLE_BYTES", 100)
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * 50_000)
    first = identity.file_digest(path)
    path.write_bytes(b"y" + b"x" * 49_999)  # the first block changed
    assert identity.file_digest(path)["blake2b"] != first["blake2b"]
    path.write_bytes(b"x" * 50_001)  # one byte more
    assert identity.file_digest(path)["bytes"] == 50_001
    assert identity.file_digest(path, with_mtime=True) != identity.file_digest(path)
