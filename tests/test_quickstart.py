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
    assert main(["quickstart", "--steps_scale", "0", "--output_dir", str(tmp_path)]) == 2
    assert "argument --steps_scale: expected a number > 0" in capsys.readouterr().err


def _fake_results(out, n: int = 120) -> dict:
    """What the pipeline leaves for `summary`: the students' metrics.jsonl (the distilled one at alpha 0, so
    its loss is its KD part) and the three models' results, without training anything."""
    from lmdistill.eval import wilson_interval

    for name, kd in (("student_ce", False), ("student_kd", True)):
        (out / name).mkdir(parents=True)
        ce = [2.0 / s + 1.0 if kd else 2.5 / s + 0.5 for s in range(1, 11)]
        rows = [{"type": "train", "step": s, "loss": 3.0 / s if kd else ce[s - 1], "ce_loss": ce[s - 1],
                 "kd_loss": 3.0 / s if kd else None, "lr": 1e-3, "tokens_per_sec": 1000.0} for s in range(1, 11)]
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for j, (name, correct) in enumerate((("teacher", 93), ("student_ce", 23), ("student_kd", 70))):
        samples = [{"prompt": f"question {i + 1}?", "reference": f"answer {i + 1}.", "prediction": f"guess {j}",
                    "correct": i < correct} for i in range(n)]
        results[name] = {"ce": 1.0 + j, "ppl": 3.0 + j, "bits_per_byte": 0.4 + j / 10, "accuracy": correct / n,
                         "ci95": list(wilson_interval(correct, n)), "correct": correct, "questions": n,
                         "samples": samples}
    return results


def test_plots_keep_one_colour_per_model_and_show_exact_match_in_percent(tmp_path):
    from matplotlib.colors import to_hex
    from matplotlib.container import ErrorbarContainer

    from lmdistill.quickstart import summary

    results = _fake_results(tmp_path)
    figures = summary.plots(tmp_path, results)
    assert sorted(figures) == ["heldout.png", "loss.png"] and (tmp_path / "loss.png").is_file()
    seen: dict[str, set] = {}
    for line in figures["loss.png"].axes[0].get_lines():
        seen.setdefault(line.get_label().split(":")[0], set()).add(to_hex(line.get_color()))
    for ax in figures["heldout.png"].axes:
        for tick, bar in zip(ax.get_xticklabels(), ax.patches):
            seen.setdefault(tick.get_text(), set()).add(to_hex(bar.get_facecolor()))
    assert set(seen) == set(summary.LABELS.values())
    assert all(len(c) == 1 for c in seen.values()), seen  # one colour per model across both plots
    assert len({c for cs in seen.values() for c in cs}) == 3
    # exact match in percent with its Wilson interval as error bars
    acc = figures["heldout.png"].axes[2]
    assert "exact match" in acc.get_title() and "%" in acc.get_title()
    heights = [100 * results[n]["accuracy"] for n in summary.MODELS]
    assert [p.get_height() for p in acc.patches] == pytest.approx(heights)
    (errors,) = [c for c in acc.containers if isinstance(c, ErrorbarContainer)]
    ends = [v for s in errors.lines[2][0].get_segments() for v in (s[0][1], s[1][1])]
    assert ends == pytest.approx([100 * v for n in summary.MODELS for v in results[n]["ci95"]])
    # the distilled student's KD part is its total here: not drawn, so not listed as a line style of its own
    legend = next(lg for lg in figures["loss.png"].legends if lg.get_title().get_text() == "part")
    assert [t.get_text() for t in legend.get_texts()] == ["total (= KD part)", "CE part"]


def test_report_examples_are_drawn_at_random_with_a_seed(tmp_path):
    from lmdistill.quickstart import summary

    results = _fake_results(tmp_path)
    shown = lambda seed: re.findall(r"\*\*Q(\d+):\*\* question (\d+)\?", summary._samples(results, seed))  # noqa: E731
    first = shown(0)
    assert len(first) == 3 and all(q == i for q, i in first)  # the number shown is the question's own
    assert [int(q) for q, _ in first] != [1, 2, 3]
    assert shown(0) == first  # deterministic for a seed
    assert any(shown(seed) != first for seed in range(1, 4))
    assert summary.sample_indices(120, 3, 0) == sorted(int(q) - 1 for q, _ in first)
    text = summary._samples(results, 0)
    assert text.count("  - student, distilled: 'guess 2'") == 3
