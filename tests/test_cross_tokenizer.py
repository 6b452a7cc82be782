"""Cross-tokenizer building blocks: alignment by character boundaries (checked by decoding, on Chinese and English
text with multi-byte characters split differently by two tokenizers), the shared vocabulary, and the ULD and
GOLD-style losses against float64 references."""

from __future__ import annotations

import re

import pytest
import torch

from lmdistill.cli import main
from lmdistill.data.alignment import common_boundaries, shared_vocabulary
from lmdistill.losses.cross_tokenizer import gold_loss, uld_loss

TEXTS = [
    "The dog finds 3 red apples under the old bridge.",
    "小明每天早上喝一杯茶，然后去公园散步。",
    "Mixed 文本 with emoji 🙂 and Ünïcödé — ok? 好的！",
]


def _offsets(tokenizer, text):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


@pytest.mark.parametrize("text", TEXTS)
def test_aligned_positions_have_the_same_prefix_in_both_tokenizations(text, tiny_teacher_dir, minimind_tokenizer):
    from lmdistill.tokenizer import load_tokenizer

    small = load_tokenizer(tiny_teacher_dir)  # trained on a tiny English corpus: Chinese falls to bytes
    s_ids, s_off = _offsets(small, text)
    t_ids, t_off = _offsets(minimind_tokenizer, text)
    pairs = common_boundaries(s_off, t_off)
    assert pairs and pairs[0] == (0, 0)
    for i, j in pairs:
        c = s_off[i][0]
        assert t_off[j][0] == c
        assert small.decode(s_ids[:i]) == text[:c] == minimind_tokenizer.decode(t_ids[:j])
    # every character where both tokenizations' token prefixes decode to the text's prefix is found, and no other
    s_bounds = {s_off[k][0] for k in range(len(s_ids)) if small.decode(s_ids[:k]) == text[: s_off[k][0]]}
    t_bounds = {t_off[k][0] for k in range(len(t_ids))
                if minimind_tokenizer.decode(t_ids[:k]) == text[: t_off[k][0]]}
    assert {s_off[i][0] for i, _ in pairs} == s_bounds & t_bounds
    if any(ord(ch) > 127 for ch in text):  # multi-byte characters: some tokens of one side are not aligned
        assert len(pairs) < max(len(s_ids), len(t_ids))


def test_a_split_character_is_not_a_boundary():
    # student: one token per character; teacher: the second character in two byte tokens (same offsets)
    assert common_boundaries([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (1, 2), (2, 3)]) == [(0, 0), (1, 1), (2, 3)]
    assert common_boundaries([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)]) == [(0, 0), (2, 1)]
    # teacher: a space merged with the first byte of the next character, which runs past the character's start
    assert common_boundaries([(0, 1), (1, 2), (2, 3)], [(0, 2), (1, 3)]) == [(0, 0)]


def test_one_tokenizer_shares_its_whole_vocabulary(tiny_teacher_dir):
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_teacher_dir)
    s, t = shared_vocabulary(tok, tok)
    assert torch.equal(s, t) and len(s) == len(tok)


def test_two_tokenizers_share_tokens_of_the_same_bytes(tiny_teacher_dir, minimind_tokenizer):
    from lmdistill.data.alignment import token_bytes
    from lmdistill.tokenizer import load_tokenizer

    small = load_tokenizer(tiny_teacher_dir)
    s, t = shared_vocabulary(small, minimind_tokenizer)
    assert 256 <= len(s) < len(small)  # at least the byte alphabet; not every merge
    sb, tb = token_bytes(small), token_bytes(minimind_tokenizer)
    assert all(sb[i] == tb[j] and sb[i] is not None for i, j in zip(s.tolist(), t.tolist()))


def _ref_sorted_l1(q, p):
    n = max(len(q), len(p))
    qs = sorted(q.tolist(), reverse=True) + [0.0] * (n - len(q))
    ps = sorted(p.tolist(), reverse=True) + [0.0] * (n - len(p))
    return sum(abs(a - b) for a, b in zip(qs, ps))


def test_uld_matches_its_definition_and_ignores_token_identity():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 11, generator=g, dtype=torch.float64)
    got = uld_loss(zs, zt, temperature=2.0)
    for r in range(4):
        want = _ref_sorted_l1(torch.softmax(zs[r] / 2, -1), torch.softmax(zt[r] / 2, -1))
        assert float(got[r]) == pytest.approx(want, rel=1e-12)
    assert torch.allclose(uld_loss(zt, zt[:, torch.randperm(11, generator=g)]), torch.zeros(4, dtype=torch.float64))
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, zt).sum(), (zs,))


def test_gold_with_every_token_shared_is_the_forward_kl():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 9, generator=g, dtype=torch.float64)
    ids = torch.arange(9)
    got = gold_loss(zs, zt, ids, ids)
    logp, logq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), zs)[0], torch.autograd.grad(want.sum(), zs)[0])


def test_gold_compares_shared_tokens_exactly_and_the_rest_by_uld():
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 8, generator=g, dtype=torch.float64)
    sid, tid = torch.tensor([0, 2, 5]), torch.tensor([7, 1, 3])  # student 0 <-> teacher 7, ...
    got = gold_loss(zs, zt, sid, tid, matched_weight=0.7, unmatched_weight=0.3)
    q, p = torch.softmax(zs, -1), torch.softmax(zt, -1)
    for r in range(3):
        pm, qm = p[r, tid] / p[r, tid].sum(), q[r, sid] / q[r, sid].sum()
        kl = (pm * (pm.log() - qm.log())).sum()
        s_free = [i for i in range(6) if i not in sid.tolist()]
        t_free = [i for i in range(8) if i not in tid.tolist()]
        want = 0.7 * kl + 0.3 * _ref_sorted_l1(q[r, s_free].detach(), p[r, t_free])
        assert float(got[r].detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    assert torch.autograd.gradcheck(lambda x: gold_loss(x, zt, sid, tid).sum(), (zs,))


# -- the loss over a batch, against a dense reference ---------------------------------------------------------------
@pytest.mark.parametrize("kind,alpha,top_k", [("uld", 0.0, None), ("uld", 0.3, 4), ("gold", 0.0, None),
                                              ("gold", 0.5, None)])
def test_cross_loss_matches_a_dense_float64_reference(kind, alpha, top_k):
    from lmdistill.data import IGNORE_INDEX
    from lmdistill.losses.cross_tokenizer import cross_tokenizer_loss_parts

    g = torch.Generator().manual_seed(3)
    B, T, H, Ht, Vs, Vt = 2, 6, 5, 7, 9, 12
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    Ws = torch.randn(Vs + 2, H, generator=g, dtype=torch.float64, requires_grad=True)  # 2 padded rows
    ht = torch.randn(7, Ht, generator=g, dtype=torch.float64)
    Wt = torch.randn(Vt, Ht, generator=g, dtype=torch.float64)
    targets = torch.randint(0, Vs, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX
    rows = torch.tensor([2, 3, 5, 6, 7, 9, 10])
    shared = (torch.tensor([0, 3, 4]), torch.tensor([5, 1, 11]))
    parts = cross_tokenizer_loss_parts(hs, Ws, None, targets, rows, ht, Wt, None, kind, Vs, Vt, temperature=1.5,
                                       alpha=alpha, top_k=top_k, shared=shared, chunk_size=3)
    got = torch.autograd.grad(parts.loss, (hs, Ws))

    zs = hs.reshape(-1, H)[rows] @ Ws[:Vs].T
    zt = ht @ Wt.T
    kd = (uld_loss(zs, zt, 1.5, top_k) if kind == "uld" else gold_loss(zs, zt, *shared, temperature=1.5)).sum()
    logits = hs @ Ws.T
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, Vs + 2), targets.reshape(-1), reduction="sum")
    ref = alpha * ce + (1 - alpha) * kd if alpha > 0 else kd
    want = torch.autograd.grad(ref, (hs, Ws))
    torch.testing.assert_close(parts.loss, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert parts.terms[kind] == pytest.approx(float(kd.detach())) and parts.terms["ce"] == pytest.approx(float(ce.detach()))


# -- examples and runs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_chat(tmp_path_factory):
    import json

    turns = [("What does Ada drink?", "Usually Ada drinks tea."), ("小明喝什么？", "小明每天早上喝一杯茶。"),
             ("Mixed 文本?", "Yes: 文本 with Ünïcödé and 🙂.")]
    path = tmp_path_factory.mktemp("mixed") / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for k in range(12):
            q, a = turns[k % 3]
            conv = [{"role": "user", "content": f"{q} ({k})"}, {"role": "assistant", "content": a},
                    {"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"{a} Then {k}."}]
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def minimind_teacher(tmp_path_factory, minimind_tokenizer):
    """A tiny random teacher on the MiniMind tokenizer (6,400 tokens), saved with it."""
    from lmdistill.models import load_model

    torch.manual_seed(0)
    model = load_model("nano", tokenizer=minimind_tokenizer, hidden_size=48, num_layers=2, verbose=False)
    out = tmp_path_factory.mktemp("mm_teacher")
    model.save_pretrained(out)
    minimind_tokenizer.save_pretrained(out)
    return out


def test_one_tokenizer_aligns_every_trained_position(tiny_teacher_dir, mixed_chat):
    from lmdistill.data import IGNORE_INDEX
    from lmdistill.data.cross_tokenizer import load_cross_examples
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_teacher_dir)
    examples = load_cross_examples(mixed_chat, tok, tok, max_seq_len=256)
    for ex in examples:
        trained = [i - 1 for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX]
        assert ex["pairs"] == [(i, i) for i in trained]
        assert ex["teacher_ids"] == ex["input_ids"][: len(ex["teacher_ids"])]
    assert examples.stats.aligned == examples.stats.trained_tokens


def test_two_tokenizers_align_on_the_same_reply_text(tiny_teacher_dir, minimind_tokenizer, mixed_chat):
    from lmdistill.data.cross_tokenizer import load_cross_examples
    from lmdistill.tokenizer import load_tokenizer

    small = load_tokenizer(tiny_teacher_dir)
    examples = load_cross_examples(mixed_chat, small, minimind_tokenizer, max_seq_len=256)
    stats = examples.stats
    assert 0 < stats.aligned < stats.trained_tokens  # multi-byte characters split differently: some unaligned
    from lmdistill.data.alignment import token_bytes

    s_bytes, t_bytes = token_bytes(small), token_bytes(minimind_tokenizer)
    split_inside_a_character = 0
    for ex in examples:
        for s, t in ex["pairs"]:
            # both prefixes end with the same bytes of the same reply (after the last assistant header and the
            # empty think block MiniMind's template writes before a reply)
            s_prefix = b"".join(s_bytes[i] for i in ex["input_ids"][: s + 1]).split(b"assistant\n")[-1]
            t_prefix = b"".join(t_bytes[i] for i in ex["teacher_ids"][: t + 1]).split(b"assistant\n")[-1]
            s_prefix, t_prefix = (re.sub(rb"^<think>.*?</think>\n\n", b"", x, flags=re.S) for x in (s_prefix, t_prefix))
            assert s_prefix == t_prefix
            try:
                s_prefix.decode("utf-8")
            except UnicodeDecodeError:
                split_inside_a_character += 1
    assert split_inside_a_character > 0  # both split some character at the same byte: aligned there too
    assert "Cross-tokenizer alignment" in stats.summary()


def _run_argv(teacher, data, out, tokenizer, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--tokenizer", str(tokenizer), "--data", str(data), "--output_dir", str(out), "--max_seq_len", "96",
            "--batch_size", "4", "--log_interval", "1", "--seed", "2", *map(str, extra)]


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_a_cross_tokenizer_run_trains_and_logs(kind, minimind_teacher, tiny_teacher_dir, mixed_chat, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(_run_argv(minimind_teacher, mixed_chat, out, tiny_teacher_dir, "--cross_tokenizer", kind,
                          "--max_steps", 3, "--eval_data", mixed_chat)) == 0
    printed = capsys.readouterr().out
    assert "Cross-tokenizer alignment" in printed and "another vocabulary" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert all(r[f"{kind}_loss"] > 0 and r["aligned_tokens"] > 0 for r in train)
    assert any(r["type"] == "eval" and "bits_per_byte" in r for r in rows)


def test_one_tokenizer_through_gold_is_the_same_tokenizer_loss(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.cli import parse_plan
    from lmdistill.train.loop import Trainer

    def first_step(*extra):
        trainer = Trainer(parse_plan("distill", _run_argv(tiny_teacher_dir, tiny_chat, tmp_path / str(len(extra)),
                                                          tiny_teacher_dir, *extra)[1:]))
        return trainer.accumulate(trainer.micro_batches(0))

    same, cross = first_step(), first_step("--cross_tokenizer", "gold")
    assert cross["gold_loss"] == pytest.approx(same["kd_loss"], rel=1e-5)
    assert cross["ce_loss"] == pytest.approx(same["ce_loss"], rel=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--method", "minillm"], "not combined with --method minillm"),
    (["--on_policy_fraction", "0.5"], "not combined with --on_policy_fraction"),
    (["--feature_loss", "mse"], "not combined with --feature_loss"),
])
def test_cross_tokenizer_refusals(flags, message, minimind_teacher, tiny_teacher_dir, mixed_chat, tmp_path, capsys):
    argv = _run_argv(minimind_teacher, mixed_chat, tmp_path / "run", tiny_teacher_dir, "--cross_tokenizer", "gold",
                     *flags)
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_different_tokenizers_without_the_flag_say_how(minimind_teacher, tiny_teacher_dir, mixed_chat, tmp_path,
                                                       capsys):
    assert main(_run_argv(minimind_teacher, mixed_chat, tmp_path / "run", tiny_teacher_dir)) == 1
    assert "--cross_tokenizer uld|gold" in capsys.readouterr().err
    argv = _run_argv(minimind_teacher, mixed_chat, tmp_path / "run", tiny_teacher_dir, "--cross_tokenizer", "uld")
    argv.remove("--tokenizer")
    argv.remove(str(tiny_teacher_dir))
    assert main(argv) == 1
    assert "is a preset without a tokenizer; pass --tokenizer DIR" in capsys.readouterr().err


def test_plain_text_documents_align_over_their_whole_text(tiny_teacher_dir, minimind_tokenizer, tmp_path):
    import json

    from lmdistill.data.cross_tokenizer import load_cross_examples
    from lmdistill.tokenizer import load_tokenizer

    small = load_tokenizer(tiny_teacher_dir)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    examples = load_cross_examples(path, small, minimind_tokenizer, max_seq_len=512)
    assert len(examples) == len(TEXTS) and examples.stats.data_format == "text"
    for text, ex in zip(TEXTS, examples):
        assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == small.eos_token_id
        assert ex["pairs"][-1] == (len(ex["input_ids"]) - 2, len(ex["teacher_ids"]) - 1)  # both predict their EOS
        for s, t in ex["pairs"][:-1]:
            assert small.decode(ex["input_ids"][: s + 1]) == minimind_tokenizer.decode(ex["teacher_ids"][: t + 1])


def test_gold_with_top_k_keeps_the_teachers_k_largest():
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 8, generator=g, dtype=torch.float64)
    sid, tid = torch.tensor([0, 2, 5]), torch.tensor([7, 1, 3])
    torch.testing.assert_close(gold_loss(zs, zt, sid, tid, top_k=8), gold_loss(zs, zt, sid, tid))  # k = V: all
    got = gold_loss(zs, zt, sid, tid, top_k=3)
    q = torch.softmax(zs, -1)
    for r in range(4):
        keep = zt[r].topk(3).indices.tolist()
        p = torch.zeros(8, dtype=torch.float64)
        p[keep] = torch.softmax(zt[r, keep], -1)
        kl = 0.0
        if p[tid].sum() > 0:
            pm, qm = p[tid] / p[tid].sum(), q[r, sid] / q[r, sid].sum()
            kl = sum(float(a * (a.log() - b.log())) for a, b in zip(pm, qm) if a > 0)
        s_free = [i for i in range(6) if i not in sid.tolist()]
        t_free = [i for i in range(8) if i not in tid.tolist()]
        want = kl + _ref_sorted_l1(q[r, s_free].detach(), p[t_free])
        assert float(got[r].detach()) == pytest.approx(want, rel=1e-10)
    assert torch.isfinite(torch.autograd.grad(got.sum(), zs)[0]).all()
    # a row whose top k holds no shared token: no KL term, finite gradients
    zt2 = zt.clone()
    zt2[0] = torch.tensor([0.0, -9, 5, -9, 6, 7, 0, -9], dtype=torch.float64)  # top 3: ids 2, 4, 5 (unshared)
    lone = gold_loss(zs, zt2, sid, tid, top_k=3)
    assert torch.isfinite(lone).all() and torch.isfinite(torch.autograd.grad(lone.sum(), zs)[0]).all()


def test_gold_runs_with_top_k(minimind_teacher, tiny_teacher_dir, mixed_chat, tmp_path):
    import json

    out = tmp_path / "run"
    assert main(_run_argv(minimind_teacher, mixed_chat, out, tiny_teacher_dir, "--cross_tokenizer", "gold",
                          "--top_k", 20, "--max_steps", 2)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gold_loss"] > 0 for r in rows if r["type"] == "train")
