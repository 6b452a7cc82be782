"""`lmdistill generate`: prompts from any format, sampled replies as MiniMind conversations, exact resume."""

from __future__ import annotations

import json

import pytest

from lmdistill.cli import main
from lmdistill.errors import LmdistillError
from lmdistill.data import load_prompts
from lmdistill.generate import prompt_key


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompts_from_every_format_drop_the_final_reply(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "so."}]
    cases = {
        "minimind": ({"conversations": conv}, conv[:3]),
        "prompt only": ({"conversations": conv[:1]}, conv[:1]),
        "alpaca": ({"instruction": "add", "input": "1+1"}, None),
        "prompt_completion": ({"prompt": "say hi"}, [{"role": "user", "content": "say hi"}]),
    }
    for name, (record, expected) in cases.items():
        prompts = load_prompts(_write(tmp_path / "p.jsonl", [record]))
        assert len(prompts) == 1 and prompts[0][-1]["role"] == "user", name
        if expected is not None:
            assert prompts[0] == expected, name
    with pytest.raises(LmdistillError, match=r"p\.jsonl:1: a plain-text record has no prompt"):
        load_prompts(_write(tmp_path / "p.jsonl", [{"text": "just text"}]))
    with pytest.raises(LmdistillError, match=r"p\.jsonl:2: missing field 'conversations'"):  # one format a file
        load_prompts(_write(tmp_path / "p.jsonl", [{"conversations": conv}, {"text": "just text"}]))
    assert prompt_key(conv[:1]) == prompt_key([dict(conv[0])]) != prompt_key(conv[:3])


def _prompts(tmp_path, n=5):
    return _write(tmp_path / "prompts.jsonl", [{"conversations": [{"role": "user", "content": f"the cat sees {i}"},
                                                                 {"role": "assistant", "content": "old"}]}
                                               for i in range(n)])


def _generate(teacher, prompts, out, *extra):
    return main(["generate", "--model", str(teacher), "--prompts", str(prompts), "--output_file", str(out),
                 "--max_new_tokens", "6", "--batch_size", "3", "--temperature", "0.8", "--device", "cpu",
                 *map(str, extra)])


def _lines(path):
    return [json.loads(x)["conversations"] for x in path.read_text().splitlines()]


def test_generate_writes_conversations_that_train_reads(tiny_teacher_dir, tmp_path, capsys):
    from lmdistill.data import load_examples
    from lmdistill.tokenizer import load_tokenizer

    prompts, out = _prompts(tmp_path), tmp_path / "gen.jsonl"
    assert _generate(tiny_teacher_dir, prompts, out, "--num_samples", 2, "--seed", 3) == 0
    rows = _lines(out)
    assert len(rows) == 10
    assert all(r[-1]["role"] == "assistant" and r[-1]["content"] != "old" and len(r) == 2 for r in rows)
    assert sorted(r[0]["content"] for r in rows) == sorted(f"the cat sees {i}" for i in range(5) for _ in range(2))
    assert "replies" in capsys.readouterr().out
    load_examples(out, load_tokenizer(tiny_teacher_dir), 64)  # a training file as it is
    again = tmp_path / "again.jsonl"
    assert _generate(tiny_teacher_dir, prompts, again, "--num_samples", 2, "--seed", 3) == 0
    assert again.read_text() == out.read_text()  # seeded sampling repeats


def test_generate_resumes_after_a_kill_mid_line(tiny_teacher_dir, tmp_path, capsys):
    prompts, out = _prompts(tmp_path), tmp_path / "gen.jsonl"
    assert _generate(tiny_teacher_dir, prompts, out, "--num_samples", 1) == 0
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"conversations": [{"role": "user", "cont')  # what a kill mid-write leaves
    capsys.readouterr()
    assert _generate(tiny_teacher_dir, prompts, out, "--num_samples", 2) == 0
    text = capsys.readouterr().out
    assert "removed an incomplete last line" in text and "5 already in" in text and "5 to generate" in text
    assert out.read_text().startswith(first)
    rows = _lines(out)
    assert len(rows) == 10 and all(sum(r[0] == q[0] for q in rows) == 2 for r in rows)
    assert _generate(tiny_teacher_dir, prompts, out, "--num_samples", 2) == 0  # nothing left to do
    assert "0 to generate" in capsys.readouterr().out and len(_lines(out)) == 10


def test_generate_errors_are_one_line(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert _generate(tiny_teacher_dir, tmp_path / "none.jsonl", out) == 1
    assert "--prompts: no such file" in capsys.readouterr().err
    assert _generate(tiny_teacher_dir, _prompts(tmp_path), out, "--top_p", "0") == 2
    assert "argument --top_p" in capsys.readouterr().err
    out.write_text("not json\n")
    assert _generate(tiny_teacher_dir, _prompts(tmp_path), out) == 1
    assert "gen.jsonl:1: expected a line written by `lmdistill generate`" in capsys.readouterr().err


def test_top_k_and_prompt_length_options(tiny_teacher_dir, tmp_path, monkeypatch):
    import lmdistill.models.generation as generation

    seen = {}
    real = generation.generate_replies

    def spy(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs, longest=max(map(len, prompts)))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_replies", spy)
    out = tmp_path / "gen.jsonl"
    assert _generate(tiny_teacher_dir, _prompts(tmp_path), out, "--top_k", 5, "--max_prompt_tokens", 4) == 0
    assert seen["sample_top_k"] == 5 and seen["longest"] == 4 and len(_lines(out)) == 5
