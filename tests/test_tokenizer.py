"""Training the byte-level BPE tokenizer: special tokens, round trip, chat template, files of every format."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lmdistill.cli import main
from lmdistill.data import load_examples
from lmdistill.errors import LmdistillError
from lmdistill.tokenizer import train_tokenizer

CORPUS = ["hello world, how are you today? I am fine, thank you.", "你好，今天天气很好。我们去公园吧！",
          "The quick brown fox jumps over the lazy dog."] * 30


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(vocab_size=300, output_dir=path, texts=CORPUS)
    return AutoTokenizer.from_pretrained(str(path)), path


def test_special_tokens_match_minimind_layout(saved):
    tok, path = saved
    assert len(tok) == 300
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                          "<think>", "</think>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 0)
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("text", ["hello world", "你好，世界！", "emoji 🙂 and tabs\tand\nnewlines", "unseen: ßøλ"])
def test_round_trip(saved, text):
    tok, _ = saved
    ids = tok(text)["input_ids"]  # no BOS/EOS added
    assert tok.decode(ids) == text


def test_think_tokens_are_single_and_kept_when_decoding(saved):
    tok, _ = saved
    ids = tok("<think>\nhm\n</think>\n\nok<|im_end|>")["input_ids"]
    assert ids[0] == 3 and 4 in ids and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nhm\n</think>\n\nok"


def test_chat_template_is_chatml_with_optional_think_block(saved):
    tok, _ = saved
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A", "reasoning_content": "R"},
                {"role": "user", "content": "U2"}, {"role": "assistant", "content": "B"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n")
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


def test_trains_on_files_of_every_format(tmp_path):
    turns = [{"role": "user", "content": "zebra zebra"},
             {"role": "assistant", "content": "quokka", "reasoning_content": "x"}]
    (tmp_path / "a.jsonl").write_text(json.dumps({"conversations": turns}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "zebra", "input": "", "output": "quokka"}]))
    (tmp_path / "c.txt").write_text("zebra quokka " * 20)
    tok = train_tokenizer([tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "c.txt"], vocab_size=300)
    assert len(tok(" quokka")["input_ids"]) == 1 and len(tok(" zebra")["input_ids"]) == 1


def test_small_corpus_gives_a_smaller_vocab_and_bad_inputs_raise(tmp_path):
    assert len(train_tokenizer(vocab_size=5000, texts=["tiny corpus"])) < 5000
    with pytest.raises(LmdistillError, match="vocab_size must be at least 261"):
        train_tokenizer(vocab_size=100, texts=CORPUS)
    with pytest.raises(LmdistillError, match="no text"):
        train_tokenizer(vocab_size=300, texts=[])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(LmdistillError, match=r"bad\.jsonl:1: invalid JSON"):
        train_tokenizer([tmp_path / "bad.jsonl"], vocab_size=300)


def test_cli_writes_a_loadable_folder_used_by_load_examples(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in
                            [("how are you?", "fine, thank you."), ("hello", "hello world")] * 5))
    out = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(data), "--vocab_size", "300", "--output_dir", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(out))
    examples = load_examples(data, tok)
    assert tok.decode([t for t in examples[0]["labels"] if t != -100]) == "fine, thank you.<|im_end|>"


def test_minimind_tokenizer_is_the_reference_layout(minimind_tokenizer):
    assert minimind_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(minimind_tokenizer) == 6400


def test_real_corpus_trains_the_target_vocab(tmp_path):
    from conftest import shared_file

    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    tok = train_tokenizer(vocab_size=2000, texts=[text])
    assert len(tok) == 2000 and tok.decode(tok(text[:1000])["input_ids"]) == text[:1000]
