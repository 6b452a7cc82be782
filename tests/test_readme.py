"""The README's numbers are what runs show: preset parameter counts (on the meta device, at the vocabulary the
README states) and the quickstart's tokenizer size (its data and tokenizer, made again for seed 0)."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from lmdistill.models import PRESETS, count_parameters, load_model

README = (REPO / "README.md").read_text(encoding="utf-8")


def _paragraph(starts: str) -> str:
    """The README paragraph or list item that starts with `starts`, as one line."""
    text = README[README.index(starts):]
    end = min(i for i in (text.find("\n\n"), text.find("\n- ")) if i > 0)
    return " ".join(text[:end].split())


def _matches(shown: str, count: int) -> bool:
    """`shown` ('25.8', '0.53') is `count` in millions at the precision shown."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return round(count / 1e6, decimals) == float(shown)


def _count(name: str, vocab: int, **overrides) -> tuple[int, int]:
    return count_parameters(load_model(name, device="meta", vocab_size=vocab, verbose=False, **overrides))


def test_readme_preset_counts_match_the_models():
    models = _paragraph("- **Models**")
    vocab = int(re.search(r"at MiniMind's ([\d,]+)-token vocabulary", models)[1].replace(",", ""))
    assert vocab == 6400
    shown = re.findall(r"`([\w.-]+)` \(([\d.]+)M(?: total / ([\d.]+)M active)?\)", models)
    assert {name for name, _, _ in shown} == set(PRESETS)
    for name, total, active in shown:
        counts = _count(name, vocab)
        assert _matches(total, counts[0]), (name, total, counts)
        assert (active == "") == (counts[0] == counts[1]), name  # "total / active" only for MoE
        assert not active or _matches(active, counts[1]), (name, active, counts)


def test_readme_quickstart_tokenizer_and_model_sizes(tmp_path):
    from lmdistill.quickstart import pipeline

    text = _paragraph("On a CPU, with no network")
    m = re.search(r"tokenizer \(([\d,]+) tokens requested, but the small corpus yields only ([\d,]+) at seed 0", text)
    requested, size = (int(g.replace(",", "")) for g in m.groups())
    recipe = pipeline.Recipe()
    assert requested == recipe.vocab_size
    facts = pipeline.make_data(tmp_path, recipe, seed=0, clock=pipeline.Clock())
    assert facts["tokenizer_size"] == size
    teacher = re.search(r"teacher \(256 x 2, ([\d.]+)M parameters at ([\d,]+) tokens\)", text)
    assert int(teacher[2].replace(",", "")) == size
    assert _matches(teacher[1], _count(recipe.teacher, size, num_layers=recipe.teacher_layers)[0])
    student = re.search(r"students \(128 x 2, ([\d.]+)M\)", text)
    assert _matches(student[1], _count(recipe.student, size)[0])
    models = _paragraph("- **Models**")
    assert re.search(rf"quickstart's `nano`, at {size} tokens, has {student[1]}M", models)


@pytest.mark.parametrize("shown, count, ok", [("25.8", 25_829_888, True), ("26", 25_829_888, True),
                                              ("25.9", 25_829_888, False), ("0.53", 533_760, True)])
def test_matches_reads_the_precision_shown(shown, count, ok):
    assert _matches(shown, count) == ok
