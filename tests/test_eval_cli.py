"""`lmdistill eval` end to end on tiny saved models: eval.json / eval.md, teacher metrics, errors."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from lmdistill.cli import main
from lmdistill.data import load_examples
from lmdistill.eval import evaluate_lm
from lmdistill.models import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_model(path, tokenizer, seed):
    torch.manual_seed(seed)
    load_model("nano", tokenizer=tokenizer, hidden_size=48, num_layers=2, verbose=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    return _save_model(tmp_path_factory.mktemp("student"), tok, seed=1)


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    """A model whose tokenizer was trained on other text: a different vocabulary."""
    from lmdistill.tokenizer import train_tokenizer

    tok = train_tokenizer(texts=["zebra quartz jumps over lazy vixens"] * 50 + ["a dog likes the old book"] * 20,
                          vocab_size=300)
    return _save_model(tmp_path_factory.mktemp("other"), tok, seed=2)


def test_lm_with_teacher_writes_json_and_table(tmp_path, capsys, student_dir, tiny_teacher_dir, tiny_chat,
                                              tiny_tokenizer_dir):
    teacher = str(tiny_teacher_dir)
    out = tmp_path / "eval"
    rc = main(["eval", "--model", student_dir, "--model", teacher, "--teacher", teacher, "--data", str(tiny_chat),
               "--max_examples", "12", "--batch_size", "5", "--output_dir", str(out)])
    assert rc == 0
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == [student_dir, teacher]
    # the teacher against itself: no divergence, full agreement
    assert results[teacher]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert results[teacher]["agreement"] == 1.0
    # the student's numbers are evaluate_lm's on the same 12 examples
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    examples = load_examples(tiny_chat, tok, max_seq_len=512)[:12]
    expected = evaluate_lm(load_model(student_dir, verbose=False), examples, tok,
                           teacher=load_model(teacher, verbose=False), batch_size=5)
    got = results[student_dir]
    for key in ("ce", "ppl", "bits_per_byte", "kl_to_teacher", "agreement", "tokens"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert got["kl_to_teacher"] > 1e-4 and got["examples"] == 12
    table = (out / "eval.md").read_text()
    assert "| model | tokens | CE | PPL | bits/byte | KL to teacher | agreement |" in table
    assert f"| {teacher} | {expected['tokens']:,} |" in table and "| 100.00% |" in table
    assert sum(line.startswith(f"| {student_dir} |") for line in table.splitlines()) == 1
    assert "| model | tokens |" in capsys.readouterr().out


def test_different_tokenizers_get_bits_per_byte_but_no_kl(tmp_path, capsys, student_dir, other_tokenizer_dir,
                                                           tiny_teacher_dir, tiny_chat):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", student_dir, "--model", other_tokenizer_dir, "--teacher", str(tiny_teacher_dir),
               "--data", str(tiny_chat), "--max_examples", "4", "--output_dir", str(out)])
    assert rc == 0
    results = json.loads((out / "eval.json").read_text())
    assert "kl_to_teacher" in results[student_dir]
    assert "kl_to_teacher" not in results[other_tokenizer_dir] and results[other_tokenizer_dir]["bits_per_byte"] > 0
    assert results[other_tokenizer_dir]["tokens"] != results[student_dir]["tokens"]  # its own tokenization
    printed = capsys.readouterr().out
    assert f"{other_tokenizer_dir}: no KL/agreement" in printed and "compare them by bits/byte" in printed
    assert "compare them by bits/byte" in (out / "eval.md").read_text()


def test_exact_match_and_rouge_tasks(tmp_path, student_dir, tiny_chat):
    out = tmp_path / "em"
    # the preset has no tokenizer of its own: it borrows the folder model's
    rc = main(["eval", "--model", student_dir, "--model", "nano", "--data", str(tiny_chat), "--task", "exact_match",
               "--max_examples", "6", "--max_new_tokens", "4", "--batch_size", "4", "--output_dir", str(out)])
    assert rc == 0
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == [student_dir, "nano"]
    for metrics in results.values():
        assert metrics["n"] == 6 and metrics["task"] == "exact_match"
        assert metrics["ci95_low"] <= metrics["accuracy"] <= metrics["ci95_high"]
        assert len(metrics["samples"]) == 5
    assert "| model | n | accuracy | 95% CI | unfinished |" in (out / "eval.md").read_text()

    out = tmp_path / "rouge"
    assert main(["eval", "--model", student_dir, "--data", str(tiny_chat), "--task", "rouge", "--max_examples", "3",
                 "--max_new_tokens", "3", "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())[student_dir]
    assert metrics["n"] == 3 and 0.0 <= metrics["rouge_l"] <= 1.0
    assert "| Rouge-L | Rouge-L 95% CI |" in (out / "eval.md").read_text()


def test_without_output_dir_nothing_is_written(tmp_path, monkeypatch, capsys, student_dir, tiny_chat):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", student_dir, "--data", str(tiny_chat), "--max_examples", "2"]) == 0
    assert "| model |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_models_from_a_yaml_recipe(tmp_path, student_dir, tiny_chat):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {student_dir}\ndata: {tiny_chat}\nmax_examples: 2\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["eval", "--config", str(recipe)]) == 0
    assert list(json.loads((tmp_path / "out" / "eval.json").read_text())) == [student_dir]


@pytest.mark.parametrize("extra, message", [
    (["--data", "{data}"], "--model is required"),
    (["--model", "{student}"], "the following arguments are required: --data"),
    (["--model", "{student}", "--model", "{student}", "--data", "{data}"], "is given more than once"),
    (["--model", "{student}", "--data", "{data}", "--task", "rouge", "--teacher", "{student}"],
     "--teacher applies to --task lm only"),
    (["--model", "{student}", "--data", "{data}", "--task", "exact_match", "--answer_regex", "(#"],
     "not a valid regular expression"),
    (["--model", "{student}", "--data", "{data}", "--answer_regex", "#"], "--answer_regex applies to"),
    (["--model", "{student}", "--data", "{data}", "--batch_size", "0"], "argument --batch_size: expected an integer >= 1"),
    (["--model", "nano", "--data", "{data}"], "no tokenizer: --model nano has no tokenizer files"),
    (["--model", "{missing}", "--tokenizer", "{student}", "--data", "{data}"],
     "no such folder, and not a preset name"),
    (["--model", "{student}", "--data", "{bad}", "--task", "exact_match"],
     r"bad\.jsonl:2: expected the conversation to end with the assistant's reference reply"),
])
def test_errors_are_one_paragraph(tmp_path, capsys, student_dir, tiny_chat, extra, message):
    import re

    bad = tmp_path / "bad.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad.write_text(json.dumps({"conversations": turns}) + "\n" + json.dumps({"conversations": turns[:1]}) + "\n")
    values = {"student": student_dir, "data": str(tiny_chat), "missing": str(tmp_path / "nope"), "bad": str(bad)}
    argv = [arg.format(**values) if "{" in arg and arg[1:-1] in values else arg for arg in extra]
    code = main(["eval", *argv, "--output_dir", str(tmp_path / "out")])
    assert code == (2 if message.startswith(("argument", "the following")) else 1)  # 2: a bad or missing flag
    err = capsys.readouterr().err
    assert err.startswith("lmdistill eval: error:") and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
