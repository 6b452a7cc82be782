"""MiniLLM (--method minillm): its per-token weights, the weighted fused loss against float64 references, the
exact-gradient identity of the estimator, the teacher-mixed sampler, and the run end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from lmdistill.cli import main, parse_plan
from lmdistill.data import IGNORE_INDEX
from lmdistill.losses import fused_teacher_distillation_loss_parts
from lmdistill.losses.minillm import minillm_weights


def _argv(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4",
            "--max_new_tokens", "6", "--log_interval", "1", "--seed", "2", "--method", "minillm", *map(str, extra)]


def test_minillm_runs_and_logs_its_terms(tiny_teacher_dir, tiny_chat, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 2)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["on_policy"] is True and r["generated_tokens"] > 0
        for key in ("rkl_loss", "pg_loss", "lm_loss", "reward", "importance_weight", "clipped_share"):
            assert math.isfinite(r[key]), key
        assert r["rkl_loss"] > 0 and r["lm_loss"] > 0
    assert (out / "model.safetensors").is_file()


# -- the per-token weights ----------------------------------------------------------------------------------------
def _weights_reference(logq, logp, logmix, lengths, clip, normalized):
    """Per-token (kd, pg) weights written from the paper's formulas, one token at a time in float64."""
    kd, pg = [], []
    for b, n in enumerate(lengths):
        r = [float(logp[b, t] - logq[b, t]) for t in range(n)]
        for t in range(n):
            after = r[t + 1 : n]
            future = (sum(after) / len(after) if after else 0.0) if normalized else sum(after)
            w = math.exp(float(logq[b, t] - logmix[b, t]))
            if clip is not None:
                w = min(max(w, 1 - clip), 1 + clip)
            kd.append(w)
            pg.append(w * future)
    return torch.tensor(kd, dtype=torch.float64), torch.tensor(pg, dtype=torch.float64)


@pytest.mark.parametrize("clip,normalized", [(0.2, True), (None, False), (0.5, False), (None, True)])
def test_weights_match_the_paper_formulas(clip, normalized):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3]
    logq, logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3, -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    alpha = 0.3
    logmix = torch.logaddexp(logp + math.log(alpha), logq + math.log(1 - alpha))
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    got = minillm_weights(logq, logp, logmix, mask, clip=clip, length_normalized=normalized)
    kd, pg = _weights_reference(logq, logp, logmix, lengths, clip, normalized)
    torch.testing.assert_close(got.kd, kd)
    torch.testing.assert_close(got.pg, pg)
    assert got.stats["clipped_share"] == pytest.approx(0.0 if clip is None else float((kd != torch.tensor(
        [math.exp(float(logq[b, t] - logmix[b, t])) for b, n in enumerate(lengths) for t in range(n)],
        dtype=torch.float64)).float().mean()))


def test_student_sampling_has_unit_importance_weights():
    logq, logp = -torch.rand(2, 4, dtype=torch.float64), -torch.rand(2, 4, dtype=torch.float64)
    w = minillm_weights(logq, logp, logq, torch.ones(2, 4, dtype=torch.bool), clip=None)
    assert torch.equal(w.kd, torch.ones(8, dtype=torch.float64))


# -- the weighted fused loss ----------------------------------------------------------------------------------------
def test_weighted_fused_loss_matches_a_float64_reference():
    """sum_i kd_w[i] KL(q_i || p_i) + ce_w[i] * (-log q_i[y_i]): value and gradients to hidden states and lm_head,
    with negative CE weights (advantages), padded rows and ignored positions."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 5, 6, 11
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    Ws = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, 3:] = IGNORE_INDEX
    n = int((labels != IGNORE_INDEX).sum())
    kd_w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    ce_w = torch.randn(n, generator=g, dtype=torch.float64)
    scores = _Rows(zt.reshape(-1, V)[(labels != IGNORE_INDEX).reshape(-1)])  # one row per trained position
    parts = fused_teacher_distillation_loss_parts(hs, Ws, scores, labels, divergence="reverse_kl",
                                                  reduction="sum", kd_weights=kd_w, ce_weights=ce_w, chunk_size=4)
    gh, gW = torch.autograd.grad(parts.loss, (hs, Ws))

    hs2, Ws2 = hs.detach().clone().requires_grad_(), Ws.detach().clone().requires_grad_()
    rows = (labels != IGNORE_INDEX).reshape(-1)
    logq = torch.log_softmax((hs2 @ Ws2.T).reshape(-1, V)[rows], -1)
    logp = torch.log_softmax(zt.reshape(-1, V)[rows], -1)
    rkl = (logq.exp() * (logq - logp)).sum(-1)
    nll = -logq.gather(-1, labels.reshape(-1)[rows][:, None]).squeeze(-1)
    ref = (kd_w * rkl).sum() + (ce_w * nll).sum()
    rh, rW = torch.autograd.grad(ref, (hs2, Ws2))
    torch.testing.assert_close(parts.loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gW, rW)
    assert parts.terms["kd"] == pytest.approx(float((kd_w * rkl).sum().detach()))
    assert parts.terms["ce"] == pytest.approx(float((ce_w * nll).sum().detach()))


def test_weights_must_match_the_trained_positions():
    from lmdistill.errors import LmdistillError

    hs, Ws = torch.randn(1, 4, 3), torch.randn(5, 3)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    scores = _Rows(torch.randn(3, 5))
    with pytest.raises(LmdistillError, match="kd_weights: expected one weight per trained position \\(3\\)"):
        fused_teacher_distillation_loss_parts(hs, Ws, scores, labels, kd_weights=torch.ones(4))


class _Rows:
    """Teacher logits given one row per trained position, in order (as every Teacher's scores are)."""

    stored_k = None

    def __init__(self, z):
        self.z, self.vocab_size, self.n_rows = z, z.shape[1], z.shape[0]

    def block(self, start, rows, out):
        out.copy_(self.z[start : start + len(rows)])
        return out


# -- the estimator's expectation is the exact gradient ----------------------------------------------------------------
class _TwoStepModels:
    """A tiny autoregressive student over V tokens (h_1 = a, h_2 = E[y_1], logits W h) and a fixed teacher
    (logits zt1, then zt2[y_1]), in float64."""

    def __init__(self, V=4, H=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.V = V
        self.params = [torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True),
                       torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True),
                       torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)]
        self.zt1 = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
        self.zt2 = torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5

    def hidden(self, y1):  # [N, 2, H] for first tokens y1 [N]
        a, E, _ = self.params
        return torch.stack([a.expand(len(y1), -1), E[y1]], 1)

    def student_logprobs(self, y1):  # [N, 2, V]
        return torch.log_softmax(self.hidden(y1) @ self.params[2].T, -1)

    def teacher_logprobs(self, y1):
        return torch.log_softmax(torch.stack([self.zt1.expand(len(y1), -1), self.zt2[y1]], 1), -1)


def test_the_estimator_expectation_is_the_exact_sequence_reverse_kl_gradient():
    """Alpha = 0, no length normalization: sum over every sequence y of q(y) x grad(surrogate(y)) equals the
    gradient of KL(q(y) || p(y)) over all sequences of two tokens, exactly (the single-step decomposition)."""
    m = _TwoStepModels()
    V = m.V
    seqs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # [V^2, 2]
    logq_all, logp_all = m.student_logprobs(seqs[:, 0]), m.teacher_logprobs(seqs[:, 0])
    logq_y = logq_all.gather(-1, seqs[:, :, None]).squeeze(-1)  # [V^2, 2]
    logp_y = logp_all.gather(-1, seqs[:, :, None]).squeeze(-1)
    kl_seq = (logq_y.sum(1).exp() * (logq_y.sum(1) - logp_y.sum(1))).sum()
    exact = torch.autograd.grad(kl_seq, m.params)

    with torch.no_grad():
        q_seq = logq_y.sum(1).exp()
        w = minillm_weights(logq_y, logp_y, logq_y, torch.ones_like(seqs, dtype=torch.bool), clip=None,
                            length_normalized=False)
    per_seq = q_seq.repeat_interleave(2)  # each sequence's probability on its two rows
    scores = _Rows(torch.stack([m.zt1.expand(len(seqs), -1), m.zt2[seqs[:, 0]]], 1).reshape(-1, V))
    parts = fused_teacher_distillation_loss_parts(m.hidden(seqs[:, 0]), m.params[2], scores, seqs, reduction="sum",
                                                  divergence="reverse_kl", kd_weights=w.kd * per_seq,
                                                  ce_weights=w.pg * per_seq)
    estimated = torch.autograd.grad(parts.loss, m.params)
    for e, g in zip(estimated, exact):
        torch.testing.assert_close(e, g)
    # the policy-gradient term matters: without it the first step's gradient misses the future reward
    single = fused_teacher_distillation_loss_parts(m.hidden(seqs[:, 0]), m.params[2], scores, seqs, reduction="sum",
                                                   divergence="reverse_kl", kd_weights=w.kd * per_seq)
    assert not torch.allclose(torch.autograd.grad(single.loss, m.params)[0], exact[0])


def test_one_token_replies_at_alpha_zero_give_the_exact_reverse_kl_gradient():
    """Whatever token was sampled, a one-token reply's MiniLLM gradient is that of KL(q(.|x) || p(.|x))."""
    m = _TwoStepModels(seed=3)
    logq = torch.log_softmax(m.params[2] @ m.params[0], -1)
    logp = torch.log_softmax(m.zt1, -1)
    exact = torch.autograd.grad((logq.exp() * (logq - logp)).sum(), m.params[::2])
    for y in range(m.V):
        lq, lp = logq[y].detach().view(1, 1), logp[y].view(1, 1)
        w = minillm_weights(lq, lp, lq, torch.ones(1, 1, dtype=torch.bool))  # defaults: clipped, normalized
        parts = fused_teacher_distillation_loss_parts(m.params[0].view(1, 1, -1), m.params[2], _Rows(m.zt1.view(1, -1)),
                                                      torch.tensor([[y]]), reduction="sum", divergence="reverse_kl",
                                                      kd_weights=w.kd, ce_weights=w.pg)
        got = torch.autograd.grad(parts.loss, m.params[::2])
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b)


# -- teacher-mixed sampling -------------------------------------------------------------------------------------------
def _pair(tiny_teacher_dir):
    from lmdistill.models import load_model, load_teacher
    from lmdistill.teachers import OnlineTeacher
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_teacher_dir)
    torch.manual_seed(0)
    student = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=1, verbose=False)
    teacher = OnlineTeacher(load_teacher(str(tiny_teacher_dir), dtype="float32", device="cpu", tokenizer=tok,
                                         verbose=False), len(tok))
    return tok, student, teacher


def test_mixed_sampling_records_each_models_log_probabilities(tiny_teacher_dir):
    """The recorded log q, log p of every sampled token equal a teacher-forced forward of prompt + reply, and the
    mixture's is log(alpha p + (1 - alpha) q); rows stop at their own stop token (left-padded prompts)."""
    from lmdistill.train.minillm import sample_mixed

    tok, student, teacher = _pair(tiny_teacher_dir)
    prompts = [list(range(5, 5 + n)) + [40 + n] for n in (1, 4, 2)]
    torch.manual_seed(1)
    replies = sample_mixed(student, teacher, tok, prompts, max_new_tokens=7, alpha=0.4, device="cpu")
    assert student.training  # restored
    for prompt, r in zip(prompts, replies):
        ids = torch.tensor([prompt + r.completion])
        n = len(r.completion)
        assert len(r.logq) == n and 1 <= n <= 8
        with torch.no_grad():
            student.eval()
            zq = student(ids).logits[0, len(prompt) - 1 : -1, : len(tok)]
            zp = teacher.model(ids).logits[0, len(prompt) - 1 : -1, : len(tok)]
        target = torch.tensor(r.completion)[:, None]
        lq = torch.log_softmax(zq.double(), -1).gather(-1, target).squeeze(-1)
        lp = torch.log_softmax(zp.double(), -1).gather(-1, target).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r.logq, dtype=torch.float64), lq, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(r.logp, dtype=torch.float64), lp, atol=1e-4, rtol=1e-4)
        mix = torch.logaddexp(lp + math.log(0.4), lq + math.log(0.6))
        torch.testing.assert_close(torch.tensor(r.logmix, dtype=torch.float64), mix, atol=1e-4, rtol=1e-4)
    student.train()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mixed_sampling_draws_from_the_mixture(tiny_teacher_dir, alpha):
    from lmdistill.models.decode import Stepper, decode_mixed

    tok, student, teacher = _pair(tiny_teacher_dir)
    student.eval()
    V, N = 6, 6000  # the first six ids only: frequencies of a small support
    prompt = torch.tensor([[5, 9, 17]]).repeat(N, 1)
    torch.manual_seed(2)
    out = decode_mixed(Stepper(student), teacher.stepper(), prompt, torch.ones_like(prompt), 1, [10**6], 0, alpha, V)
    with torch.no_grad():
        q = torch.softmax(student(prompt[:1]).logits[0, -1, :V].double(), -1)
        p = torch.softmax(teacher.model(prompt[:1]).logits[0, -1, :V].double(), -1)
    mix = alpha * p + (1 - alpha) * q
    freq = torch.bincount(out.tokens[:, 0], minlength=V).double() / N
    assert (freq - mix).abs().max() < 4 * math.sqrt(0.25 / N)
    assert torch.equal(out.logmix, out.logq) if alpha == 0 else True


def test_an_ensemble_steps_as_it_scores(tiny_teacher_dir):
    """The ensemble's next-token logits through its stepper equal its scores (both modes)."""
    from lmdistill.teachers import EnsembleTeacher

    tok, student, teacher = _pair(tiny_teacher_dir)
    other = _pair(tiny_teacher_dir)[2]
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(1.3)
    ids = torch.tensor([[5, 9, 17, 23]])
    for mode in ("logits", "probs"):
        ens = EnsembleTeacher([teacher, other], [0.3, 0.7], mode)
        stepped = ens.stepper().prefill(ids, torch.ones_like(ids))
        z1, z2 = (t.model(ids).logits[0, -1, : len(tok)].double() for t in (teacher, other))
        want = 0.3 * z1 + 0.7 * z2 if mode == "logits" else torch.logsumexp(
            torch.stack([torch.log_softmax(z1, -1) + math.log(0.3), torch.log_softmax(z2, -1) + math.log(0.7)]), 0)
        got = stepped[0].double()
        if mode == "probs":
            got = torch.log_softmax(got, -1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- the run --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--on_policy_fraction", "0.5"], "--on_policy_fraction 0.5: not used by --method minillm"),
    (["--divergence", "jsd"], "--divergence jsd: not used by --method minillm"),
    (["--temperature", "2"], "--temperature/--temperature_end: not used by --method minillm"),
    (["--alpha", "0.5"], "--alpha 0.5: not used by --method minillm (the CE on the dataset replies is --lm_coef)"),
    (["--top_k", "5"], "--top_k 5: not used by --method minillm"),
    (["--generation_top_p", "0.9"], "--generation_temperature/--generation_top_p: not used by --method minillm"),
])
def test_options_minillm_does_not_use_are_refused_before_loading(tiny_teacher_dir, tiny_chat, tmp_path, capsys,
                                                                  flags, message):
    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, *flags)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_teacher_cache_cannot_sample_for_minillm(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    argv = _argv(tiny_teacher_dir, tiny_chat, tmp_path / "run")
    i = argv.index("--teacher")
    argv[i : i + 2] = ["--teacher_cache", str(tmp_path)]
    assert main(argv) == 1
    assert "--method minillm: a teacher cache cannot score the replies the student samples" in capsys.readouterr().err


def test_prompts_only_data_needs_lm_coef_zero(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"the dog finds {i}"}]}) + "\n"
                               for i in range(12)))
    assert main(_argv(tiny_teacher_dir, prompts, tmp_path / "a", "--lm_coef", 0, "--max_steps", 2)) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("lm_loss" not in r and r["rkl_loss"] > 0 for r in rows)
    assert main(_argv(tiny_teacher_dir, prompts, tmp_path / "b", "--max_steps", 2)) == 1
    err = capsys.readouterr().err
    assert "prompts.jsonl:1: a conversation without any assistant turn" in err and "--lm_coef 0" in err


def test_each_token_group_is_normalized_by_its_own_count(tiny_teacher_dir, tiny_chat, tmp_path):
    """gradients = d/dtheta [sum(sampled terms) / N_sampled + lm_coef * sum(CE on replies) / N_replies]."""
    from lmdistill.train.loop import Trainer

    trainer = Trainer(parse_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path, "--lm_coef", 0.5,
                                                  "--accumulation_steps", 2)[1:]))
    batches = trainer.micro_batches(0)
    assert [b.group for b in batches] == ["minillm", "lm", "minillm", "lm"]
    stats = trainer.accumulate(batches)
    got = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)
    count = lambda kind: sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches if b.group == kind)
    n_s, n_lm = count("minillm"), count("lm")
    total, terms = 0.0, {}
    for b in batches:
        parts, _ = trainer.micro_loss(b)
        total = total + parts.loss / (n_s if b.group == "minillm" else n_lm)
        for k, v in parts.terms.items():
            terms[k] = terms.get(k, 0.0) + v / (n_s if b.group == "minillm" else n_lm)
    total.backward()
    for a, b in zip(got, (p.grad for p in trainer.model.parameters())):
        torch.testing.assert_close(a, b)
    assert stats["loss"] == pytest.approx(float(total.detach()))
    for k in ("rkl", "pg", "lm"):
        assert stats[f"{k}_loss"] == pytest.approx(terms[k])
    assert stats["trained_tokens"] == n_s + n_lm


def test_minillm_resume_reproduces_the_straight_run(tiny_teacher_dir, tiny_chat, tmp_path):
    from runs import lmdistill

    def run(out, env=None, *extra):
        return lmdistill(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 4, "--save_interval", 2, *extra), env)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(straight).returncode == 0
    assert run(killed, {"LMDISTILL_KILL_AT_STEP": "3"}).returncode == -9
    resumed = run(killed, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(straight), rows(killed)
    assert [r["generated_tokens"] for r in a] == [r["generated_tokens"] for r in b]
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], rel=1e-5)


def test_mix_alpha_and_clip_flags_reach_the_sampler_and_weights(tiny_teacher_dir, tiny_chat, tmp_path):
    """--teacher_mix_alpha 0 samples the student alone: every importance weight is exactly 1, nothing clipped;
    --teacher_mix_alpha 1 samples the teacher, whose tokens the random student finds unlikely: weights clipped."""
    from lmdistill.train.loop import Trainer

    def stats(*flags):
        trainer = Trainer(parse_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path / str(len(flags)),
                                                      *flags)[1:]))
        trainer.micro_batches(0)
        return trainer.source.last_stats

    alone = stats("--teacher_mix_alpha", 0)
    assert alone["importance_weight"] == 1.0 and alone["clipped_share"] == 0.0
    teacher = stats("--teacher_mix_alpha", 1, "--minillm_clip", 0.05)
    assert teacher["importance_weight"] != 1.0 and teacher["clipped_share"] > 0
