"""Teacher kinds and batch sources are registered parts: a new one is a class in one file plus one registry call,
and runs end to end through the Python API with no other file edited. Both toys below live in this file alone."""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.config import Repeated
from lmdistill.data import pad_batch
from lmdistill.data.batch import Batch
from lmdistill.losses.scores import TeacherScores
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.registry import (FULL_VOCABULARY, SCORES_NEW_TEXT, TeacherKind, TeacherSpec,
                                         register_teacher_kind, unregister_teacher_kind)
from lmdistill.train.batches import BatchSource, SourceKind, register_source, unregister_source


# -- a toy teacher kind: one fixed "favourite" token gets all the mass ---------------------------------------
class FavouriteScores(TeacherScores):
    def __init__(self, vocab_size: int, token: int):
        self.vocab_size, self.token = vocab_size, token

    def block(self, start, rows, out):
        out.fill_(-30.0)
        out[:, self.token] = 30.0
        return out


class FavouriteTeacher(Teacher):
    def __init__(self, vocab_size: int, token: int):
        self.vocab_size, self.token, self.calls = vocab_size, token, 0

    def score(self, batch):
        self.calls += 1
        return FavouriteScores(self.vocab_size, self.token)


BUILT: list[FavouriteTeacher] = []


class FavouriteKind(TeacherKind):
    name = "favourite"
    capabilities = frozenset({SCORES_NEW_TEXT, FULL_VOCABULARY})

    @staticmethod
    def declare(add):
        add("--favourite_token", action=Repeated, type=int, default=None, help="a toy teacher that always says TOKEN")

    @classmethod
    def specs(cls, values):
        return [TeacherSpec(cls.name, str(t), "--favourite_token") for t in values["favourite_token"] or []]

    @classmethod
    def build(cls, spec, ctx):
        BUILT.append(FavouriteTeacher(len(ctx.tokenizer), int(spec.ref)))
        return BUILT[-1]


def _registered(register, unregister, part):
    """A fixture's body: the part registered for one test, removed after it (so other tests see the usual parts)."""
    register(part)
    yield
    unregister(part.name)


@pytest.fixture
def favourite_kind():
    yield from _registered(register_teacher_kind, unregister_teacher_kind, FavouriteKind)


def test_a_new_teacher_kind_runs_through_the_python_api(favourite_kind, tiny_tokenizer_dir, tiny_chat, tmp_path):
    from lmdistill.api import DistillConfig, distill
    from transformers import AutoModelForCausalLM

    token = 7
    out = distill(DistillConfig(favourite_token=[token], student="nano", hidden_size=32, num_layers=1,
                                tokenizer=str(tiny_tokenizer_dir), data=str(tiny_chat), output_dir=str(tmp_path / "run"),
                                max_steps=30, batch_size=4, max_seq_len=48, learning_rate=1e-2))
    teacher = BUILT[-1]
    assert teacher.calls == 30  # one score per micro-batch
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in rows if r["type"] == "train"]
    assert kd[-1] < kd[0] / 2  # the student learned the toy teacher's distribution
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        probs = model(torch.tensor([[1, 2, 3, 4]])).logits.softmax(-1)
    assert probs[0, :, token].min() > 0.5  # ... which is "always token 7"


# -- a toy batch source: every micro-batch is the first example, batch_size times -----------------------------
class SameExampleStream(BatchSource):
    def __init__(self, dataset):
        self.dataset = dataset

    def batches(self, step):
        d = self.dataset
        rows = pad_batch([d.examples[0]] * d.batch_size, d.pad)
        return [Batch.of(rows, d.device, [0] * d.batch_size) for _ in range(d.accumulation)]


class SameExampleSource(SourceKind):
    name = "same_example"

    @staticmethod
    def declare(add):
        add("--same_example", action="store_true", help="a toy source: train on the first example only")

    @classmethod
    def selected(cls, values):
        return bool(values.get("same_example"))

    @classmethod
    def build(cls, plan, dataset, trainer):
        return SameExampleStream(dataset)


@pytest.fixture
def same_example_source():
    yield from _registered(register_source, unregister_source, SameExampleSource)


def test_a_new_batch_source_runs_through_the_python_api(same_example_source, tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.api import DistillConfig, distill, plan
    from lmdistill.data import load_examples
    from lmdistill.tokenizer import load_tokenizer

    config = DistillConfig(teacher=[str(tiny_teacher_dir)], student="nano", hidden_size=32, num_layers=1,
                           data=str(tiny_chat), output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4,
                           accumulation_steps=2, max_seq_len=48, log_interval=1, same_example=True)
    assert plan(config).source.kind == "same_example"
    out = distill(config)
    first = load_examples(str(tiny_chat), load_tokenizer(tiny_teacher_dir), 48)[0]
    per_row = sum(1 for x in first["labels"][1:] if x != -100)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_tokens"] for r in rows if r["type"] == "train"] == [per_row * 4 * 2] * 3
    config.same_example, config.output_dir = False, str(tmp_path / "other")
    assert plan(config).source.kind == "dataset"


def test_kinds_and_sources_declare_their_options(favourite_kind, same_example_source):
    from lmdistill.api import DistillConfig
    from lmdistill.cli import build_parser

    text = build_parser("distill").format_help()
    assert "--favourite_token" in text and "--same_example" in text
    with pytest.raises(Exception, match="favourite_tokn"):
        DistillConfig(favourite_tokn=[1])


def test_capability_checks_name_the_teacher_kind_and_keep_their_messages(tiny_teacher_dir, tiny_chat, tmp_path):
    """The conflicts between features are checks on capabilities: a cache cannot score the student's replies."""
    from lmdistill.api import DistillConfig, plan
    from lmdistill.errors import LmdistillError
    from lmdistill.teachers.registry import capabilities_of, why_not

    spec = TeacherSpec("online", str(tiny_teacher_dir), "--teacher")
    assert SCORES_NEW_TEXT in capabilities_of(spec) and why_not(spec, SCORES_NEW_TEXT) is None
    cached = TeacherSpec("cached", str(tmp_path), "--teacher_cache")
    assert "cannot score replies the student writes" in why_not(cached, SCORES_NEW_TEXT)
    ensemble = TeacherSpec("ensemble", members=(spec, cached))
    assert "cannot score replies the student writes" in why_not(ensemble, SCORES_NEW_TEXT)
    with pytest.raises(LmdistillError, match="--on_policy_fraction: a teacher cache holds scores"):
        plan(DistillConfig(teacher_cache=[str(tmp_path)], student="nano", data=str(tiny_chat),
                           output_dir=str(tmp_path / "run"), on_policy_fraction=0.5))
