"""`lmdistill quickstart`: the generated data (deterministic, held-out split apart, answers checkable from the
text) and one tiny end-to-end run through the CLI. Whether distillation beats CE is not asserted here: a
seconds-long run is too short to mean anything; benchmarks/quickstart_seeds.py measures it."""

import json
import math
import re
from collections import Counter

import pytest

from lmdistill.cli import main
from lmdistill.quickstart import _clear_previous_run, corpus


@pytest.fixture(scope="module")
def split():
    return corpus.generate(corpus.make_world(3), seed=3)


def test_generator_is_deterministic_for_a_seed(split):
    again = corpus.generate(corpus.make_world(3), seed=3)
    assert again == split
    other = corpus.generate(corpus.make_world(4), seed=4)
    assert other.train_text != split.train_text and other.heldout_qa != split.heldout_qa


def test_heldout_questions_are_not_in_training(split):
    world = corpus.make_world(3)
    asked = {(q["content"], a["content"]) for q, a in split.train_qa}
    heldout = {(q["content"], a["content"]) for q, a in split.heldout_qa}
    assert heldout and not asked & heldout
    trained_answers = {a["content"] for _, a in split.train_qa}
    assert not trained_answers & {a["content"] for _, a in split.heldout_qa}
    assert len(split.heldout_qa) == len(world.heldout_pairs) == len(world.favourite) // 2
    assert not set(split.heldout_text) & set(split.train_text)


def _mention_counts(texts: list[str]) -> dict[tuple[str, str], Counter]:
    """(person, topic) -> counts of the values the text mentions for it."""
    patterns = [(topic, re.compile(m.format(p=r"(\w+)", v=f"({'|'.join(spec.values)})").replace(".", r"\.")))
                for topic, spec in corpus.TOPICS.items() for m in spec.mentions]
    counts: dict[tuple[str, str], Counter] = {}
    for text in texts:
        for sentence in re.split(r"(?<=\.) ", text.split(", ", 1)[1]):
            for topic, pattern in patterns:
                if m := pattern.fullmatch(sentence):
                    counts.setdefault((m[1], topic), Counter())[m[2]] += 1
    return counts


def test_answers_are_checkable_from_the_text(split):
    """Each held-out answer is a fixed sentence naming the person's favourite, and the favourite is what the
    training text mentions most often for that person and topic: the knowledge to answer is in the text."""
    world = corpus.make_world(3)
    counts = _mention_counts(split.train_text)
    for (person, topic), (question, answer) in zip(sorted(world.heldout_pairs), split.heldout_qa):
        favourite = world.favourite[person, topic]
        assert person in question["content"]
        assert answer["content"] == corpus.TOPICS[topic].answer.format(p=person, v=favourite)
        value, n = counts[person, topic].most_common(1)[0]
        assert value == favourite and n < sum(counts[person, topic].values())  # noisy, but the mode is right


def test_clear_previous_run_removes_only_quickstart_outputs(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    _clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--steps_scale", "0.02", "--seed", "1", "--output_dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "report.md" in printed and "lmdistill distill --teacher" in printed
    for name in ("tokenizer/tokenizer.json", "teacher/model.safetensors", "student_ce/model.safetensors",
                 "student_kd/model.safetensors", "student_kd/metrics.jsonl", "data/teacher_train.jsonl",
                 "data/student_train.jsonl", "data/heldout_text.jsonl", "data/heldout_qa.jsonl", "report.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher", "student_ce", "student_kd", "seconds"}
    assert math.isfinite(results["seconds"]) and results["seconds"] > 0
    for name in ("teacher", "student_ce", "student_kd"):
        r = results[name]
        for key in ("ce", "ppl", "bits_per_byte", "accuracy"):
            assert math.isfinite(r[key]), (name, key)
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        assert ("kl_to_teacher" in r) == (name != "teacher")
    assert math.isfinite(results["student_kd"]["kl_to_teacher"])
    from PIL import Image

    for png in ("loss.png", "heldout.png"):
        with Image.open(out / png) as image:
            image.verify()
    report = (out / "report.md").read_text()
    assert "loss.png" in report and "heldout.png" in report and "lmdistill distill --teacher" in report
    # the students trained on the same 20% with the same steps
    ce = (out / "student_ce" / "lmdistill_config.yaml").read_text()
    kd = (out / "student_kd" / "lmdistill_config.yaml").read_text()
    assert "student_train.jsonl" in ce and "student_train.jsonl" in kd
    assert results["student_ce"]["train_steps"] == results["student_kd"]["train_steps"]


def test_steps_scale_must_be_positive(tmp_path, capsys):
    assert main(["quickstart", "--steps_scale", "0", "--output_dir", str(tmp_path)]) == 1
    assert "--steps_scale" in capsys.readouterr().err
