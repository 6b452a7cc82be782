"""The Teacher interface: every teacher source gives the loss the same rows as the dense online teacher, and
ensembles (BabyLlama) equal float64 references of averaged logits / mixed probabilities, on values and gradients."""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.data.batch import Batch
from lmdistill.cli import main
from lmdistill.data import load_examples, pad_batch, shift_labels
from lmdistill.losses import ProjectedScores, distillation_loss, fused_teacher_distillation_loss_parts
from lmdistill.models import forward_hidden, lm_head_of, load_model
from lmdistill.teachers import CachedTeacher, EnsembleTeacher, OnlineTeacher, TeacherCache, build_cache
from lmdistill.teachers.ensemble import EnsembleScores
from lmdistill.tokenizer import load_tokenizer

OPTIONS = [dict(divergence="forward_kl"), dict(divergence="reverse_kl", alpha=0.3),
           dict(divergence="jsd", temperature=2.0), dict(divergence="skew_reverse_kl", top_k=5),
           dict(divergence="tvd", temperature=0.7)]


def _loss_and_grads(hs, Ws, scores, labels, **options):
    hs, Ws = hs.detach().clone().requires_grad_(), Ws.detach().clone().requires_grad_()
    loss = fused_teacher_distillation_loss_parts(hs, Ws, scores, labels, chunk_size=7, **options).loss
    loss.backward()
    return loss.detach(), hs.grad, Ws.grad


def _reference(hs, Ws, teacher_logits64, labels, **options):
    hs, Ws = hs.detach().double().requires_grad_(), Ws.detach().double().requires_grad_()
    loss = distillation_loss(hs @ Ws.T, teacher_logits64, labels, **options)
    loss.backward()
    return loss.detach(), hs.grad, Ws.grad


def _close(got, want, rtol=2e-4, atol=1e-6):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol)


@pytest.fixture
def synthetic():
    torch.manual_seed(0)
    B, T, H, V = 2, 9, 8, 23
    hs, Ws = torch.randn(B, T, H), torch.randn(V, H) * 0.5
    teachers = [(torch.randn(B, T, 12), torch.randn(V, 12) * 0.7), (torch.randn(B, T, 6), torch.randn(V, 6))]
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    return hs, Ws, teachers, labels, V


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_two_teachers_equal_a_float64_reference(synthetic, options, mode):
    hs, Ws, teachers, labels, V = synthetic
    weights = [0.25, 0.75]
    scores = EnsembleScores([ProjectedScores(h, W, None, V) for h, W in teachers], weights, mode)
    z = [(h.double() @ W.double().T) for h, W in teachers]
    if mode == "logits":
        ref = weights[0] * z[0] + weights[1] * z[1]
    else:
        ref = torch.logsumexp(torch.stack([torch.log_softmax(zi, -1) + torch.log(torch.tensor(w, dtype=torch.float64))
                                           for zi, w in zip(z, weights)]), 0)
    _close(_loss_and_grads(hs, Ws, scores, labels, **options), _reference(hs, Ws, ref, labels, **options))


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_an_ensemble_of_one_teacher_twice_is_that_teacher(synthetic, mode):
    hs, Ws, teachers, labels, V = synthetic
    h, W = teachers[0]
    single = _loss_and_grads(hs, Ws, ProjectedScores(h, W, None, V), labels, divergence="jsd", temperature=1.5)
    twice = EnsembleScores([ProjectedScores(h, W, None, V)] * 2, [0.4, 0.6], mode)
    _close(_loss_and_grads(hs, Ws, twice, labels, divergence="jsd", temperature=1.5), single, rtol=1e-5)


def test_ensemble_weights_and_members_are_checked(synthetic):
    from lmdistill.errors import LmdistillError

    class Fake(OnlineTeacher):
        def __init__(self, vocab, k=None):
            self.vocab_size, self.stored_k, self.name = vocab, k, "fake"

    with pytest.raises(LmdistillError, match="expected 2 positive numbers"):
        EnsembleTeacher([Fake(5), Fake(5)], [1.0, 0.0])
    with pytest.raises(LmdistillError, match="different vocabularies"):
        EnsembleTeacher([Fake(5), Fake(6)])
    with pytest.raises(LmdistillError, match="holds only its top 3 tokens"):
        EnsembleTeacher([Fake(5), Fake(5, k=3)])
    assert EnsembleTeacher([Fake(5), Fake(5)], [1, 3]).weights == [0.25, 0.75]


# -- the contract over every Teacher, on real tiny models ----------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_teacher_dir, tiny_chat, tmp_path_factory):
    """Teacher, a second teacher of another shape, a student, one batch, and caches of the first teacher."""
    tok = load_tokenizer(tiny_teacher_dir)
    examples = load_examples(tiny_chat, tok, 48)
    torch.manual_seed(1)
    second = load_model("nano", tokenizer=tok, hidden_size=40, num_layers=1, verbose=False).eval()
    student = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=1, verbose=False)
    teacher = load_model(str(tiny_teacher_dir), verbose=False).eval()
    index = list(range(6))
    batch = Batch.of(pad_batch([examples[i] for i in index], tok.pad_token_id), "cpu", index)
    root = tmp_path_factory.mktemp("caches")
    caches = {}
    for k in (4, len(tok)):
        caches[k] = TeacherCache(build_cache(teacher, tok, examples, root / f"k{k}", k, meta={}, progress=False))
    return tok, teacher, second, student, batch, caches, examples


def _student_loss(student, scores, batch, **options):
    student.zero_grad(set_to_none=True)
    targets = shift_labels(batch.labels)
    hidden = forward_hidden(student, batch.input_ids, batch.attention_mask).hidden
    loss = fused_teacher_distillation_loss_parts(hidden, lm_head_of(student).weight, scores, targets, **options).loss
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in student.parameters()]


TEACHERS = {
    "online": lambda t, s, c: OnlineTeacher(t),
    "cache, whole vocabulary": lambda t, s, c: CachedTeacher(c["full"]),
    "ensemble of one teacher twice (logits)": lambda t, s, c: EnsembleTeacher([OnlineTeacher(t)] * 2, [1, 2]),
    "ensemble of one teacher twice (probs)": lambda t, s, c: EnsembleTeacher([OnlineTeacher(t)] * 2, [2, 1], "probs"),
    "ensemble of the teacher online and cached": lambda t, s, c: EnsembleTeacher(
        [OnlineTeacher(t), CachedTeacher(c["full"])], mode="probs"),
}


@pytest.mark.parametrize("kind", list(TEACHERS))
@pytest.mark.parametrize("options", [dict(divergence="forward_kl", temperature=2.0),
                                     dict(divergence="reverse_kl", top_k=6, alpha=0.5)], ids=["fkl-T2", "rkl-top6"])
def test_every_teacher_gives_the_dense_online_teachers_loss_and_gradients(pair, kind, options):
    tok, teacher, second, student, batch, caches, examples = pair
    made = TEACHERS[kind](teacher, second, {"full": caches[len(tok)]})
    reference = _student_loss(student, OnlineTeacher(teacher).score(batch), batch, **options)
    _close(_student_loss(student, made.score(batch), batch, **options), reference, rtol=1e-4, atol=1e-6)


def test_a_top_k_cache_is_the_online_teacher_at_that_top_k(pair):
    tok, teacher, second, student, batch, caches, examples = pair
    for options in (dict(divergence="forward_kl", temperature=2.0), dict(divergence="reverse_kl")):
        reference = _student_loss(student, OnlineTeacher(teacher).score(batch), batch, top_k=4, **options)
        _close(_student_loss(student, CachedTeacher(caches[4]).score(batch), batch, **options), reference,
               rtol=1e-4, atol=1e-6)


def test_cached_and_online_ensembles_agree(pair, tmp_path):
    tok, teacher, second, student, batch, caches, examples = pair
    cached_second = TeacherCache(build_cache(second, tok, examples, tmp_path / "second", len(tok), meta={},
                                             progress=False))
    for mode in ("logits", "probs"):
        online = EnsembleTeacher([OnlineTeacher(teacher), OnlineTeacher(second)], [0.3, 0.7], mode)
        cached = EnsembleTeacher([CachedTeacher(caches[len(tok)]), CachedTeacher(cached_second)], [0.3, 0.7], mode)
        _close(_student_loss(student, cached.score(batch), batch, divergence="jsd"),
               _student_loss(student, online.score(batch), batch, divergence="jsd"), rtol=1e-4, atol=1e-6)


# -- from the command line -----------------------------------------------------------------------------------
def test_distill_from_two_teachers_logs_kl_to_the_ensemble_and_each_teacher(tiny_teacher_dir, tiny_chat, tmp_path):
    tok = load_tokenizer(tiny_teacher_dir)
    torch.manual_seed(2)
    second = tmp_path / "second"
    load_model("nano", tokenizer=tok, hidden_size=40, num_layers=1, verbose=False).save_pretrained(second)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(tiny_teacher_dir), "--teacher", str(second), "--teacher_weights", "1,3",
            "--ensemble", "probs", "--student", "nano", "--hidden_size", "32", "--num_layers", "1", "--data",
            str(tiny_chat), "--eval_data", str(tiny_chat), "--eval_batches", "2", "--output_dir", str(out),
            "--max_steps", "2", "--batch_size", "4", "--max_seq_len", "48"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["type"] == "eval"][-1]
    assert {"kl_to_teacher", "agreement", "kl_to_teacher_1", "agreement_1", "kl_to_teacher_2", "agreement_2"} <= ev.keys()
    assert ev["kl_to_teacher_1"] != ev["kl_to_teacher_2"]
    assert (out / "model.safetensors").is_file()


def test_each_teacher_loads_in_its_own_dtype(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.cli import parse_plan
    from lmdistill.train.loop import Trainer

    tok = load_tokenizer(tiny_teacher_dir)
    second = tmp_path / "second"
    load_model("nano", tokenizer=tok, hidden_size=40, num_layers=1, verbose=False).save_pretrained(second)
    args = parse_plan("distill", ["--teacher", tiny_teacher_dir, "--teacher", second, "--teacher_dtype", "float32",
                                  "--teacher_dtype", "bfloat16", "--student", "nano", "--hidden_size", "32",
                                  "--num_layers", "1", "--data", tiny_chat, "--output_dir", tmp_path / "run",
                                  "--max_seq_len", "48", "--batch_size", "4"])
    trainer = Trainer(args)
    assert [m.model.dtype for m in trainer.teacher.members()] == [torch.float32, torch.bfloat16]
    stats = trainer.accumulate(trainer.micro_batches(0))
    assert stats["kd_loss"] > 0 and torch.isfinite(torch.tensor(stats["loss"]))
