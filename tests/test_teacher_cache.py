"""Offline teacher cache: the cached top-k teacher equals the online teacher with the same top_k, on values and
gradients; `cache-teacher` + `distill --teacher_cache` train like the online run; mismatches are clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from train_args import make_plan

from lmdistill.cli import main
from lmdistill.errors import LmdistillError
from lmdistill.losses import fused_distillation_loss, fused_topk_distillation_loss_parts
from lmdistill.teachers import TopKTeacher
from lmdistill.train.loop import Trainer


def _inputs(n=14, V=23, H=6, Ht=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, H, generator=g, dtype=torch.float64)
    Ws = torch.randn(V, H, generator=g, dtype=torch.float64)
    ht = torch.randn(n, Ht, generator=g, dtype=torch.float64)
    Wt = torch.randn(V, Ht, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    labels[0] = 2
    return hs, Ws, ht, Wt, labels


def _rows(ht, Wt, labels, k) -> TopKTeacher:
    z = (ht @ Wt.T)[labels != -100]
    vals, ids = z.topk(k, -1)
    return TopKTeacher(ids, vals, torch.logsumexp(z, -1), Wt.shape[0])


@pytest.mark.parametrize("div,T,alpha,k,top_k", [
    ("forward_kl", 2.0, 0.3, 5, None), ("forward_kl", 1.0, 0.0, 7, 4), ("reverse_kl", 1.0, 0.2, 5, None),
    ("jsd", 1.5, 0.0, 6, None), ("skew_reverse_kl", 1.0, 0.0, 6, 3), ("tvd", 1.0, 0.5, 23, None),
])
def test_cached_rows_equal_the_online_teacher_with_the_same_top_k(div, T, alpha, k, top_k):
    hs, Ws, ht, Wt, labels = _inputs()
    rows = _rows(ht, Wt, labels, k)
    if top_k is not None:  # what TeacherCache.rows does for a smaller top_k
        vals, pos = rows.logits.topk(top_k, -1)
        rows = TopKTeacher(rows.ids.gather(-1, pos), vals, rows.lse, rows.vocab_size)
    kw = dict(divergence=div, temperature=T, alpha=alpha)
    hs.requires_grad_(), Ws.requires_grad_()
    ours = fused_topk_distillation_loss_parts(hs, Ws, rows, labels, chunk_size=4, **kw).loss
    g_ours = torch.autograd.grad(ours, (hs, Ws))
    online = fused_distillation_loss(hs, Ws, ht, Wt, labels, top_k=top_k or k, chunk_size=3, **kw)
    g_online = torch.autograd.grad(online, (hs, Ws))
    torch.testing.assert_close(ours, online, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_online):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_topk_rows_errors():
    hs, Ws, ht, Wt, labels = _inputs()
    rows = _rows(ht, Wt, labels, 4)
    with pytest.raises(LmdistillError, match="top_k <= 4"):
        fused_topk_distillation_loss_parts(hs, Ws, rows, labels, top_k=5)
    with pytest.raises(LmdistillError, match="temperature 1"):
        fused_topk_distillation_loss_parts(hs, Ws, rows, labels, divergence="rkl", temperature=2.0)
    with pytest.raises(LmdistillError, match="one row per position"):
        fused_topk_distillation_loss_parts(hs, Ws, rows, torch.zeros_like(labels))


def _cache(teacher, data, out, *extra):
    return main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--output_dir", str(out),
                 "--max_seq_len", "64", "--top_k", "8", "--batch_size", "5", "--device", "cpu", *map(str, extra)])


def _distill_argv(data, out, *extra):
    return ["--student", "nano", "--hidden_size", "32", "--num_layers", "1", "--data", str(data),
            "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4", "--temperature", "2.0",
            "--alpha", "0.2", "--seed", "5", "--device", "cpu", *map(str, extra)]


def _grads(argv):
    trainer = Trainer(make_plan("distill", argv))
    stats = trainer.accumulate(trainer.micro_batches(3))
    return stats, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_cache_then_distill_matches_the_online_teacher_at_the_same_top_k(tiny_teacher_dir, tiny_chat, tmp_path,
                                                                          monkeypatch):
    from lmdistill.teachers import cache as cache_mod

    monkeypatch.setattr(cache_mod, "SHARD_POSITIONS", 300)  # several shards
    cache = tmp_path / "cache"
    assert _cache(tiny_teacher_dir, tiny_chat, cache) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["examples"] == 40 and meta["top_k"] == 8 and len(meta["shards"]) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    cached_stats, cached = _grads(_distill_argv(tiny_chat, tmp_path / "a", "--teacher_cache", cache))
    online_stats, online = _grads(_distill_argv(tiny_chat, tmp_path / "b", "--teacher", tiny_teacher_dir,
                                                "--top_k", "8"))
    assert cached.keys() == online.keys() and cached
    for name in cached:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-4, atol=1e-6, msg=name)
    assert cached_stats["kd_loss"] == pytest.approx(online_stats["kd_loss"], rel=1e-5)

    # and a whole run: steps, metrics, a saved student
    out = tmp_path / "run"
    assert main(["distill", *_distill_argv(tiny_chat, out, "--teacher_cache", cache), "--max_steps", "3",
                 "--log_interval", "1", "--top_k", "4"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3]
    assert all(r["kd_loss"] > 0 for r in rows if r["type"] == "train")
    assert (out / "config.json").is_file()


def test_cache_mismatches_are_clean_errors(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _cache(tiny_teacher_dir, tiny_chat, cache) == 0
    assert _cache(tiny_teacher_dir, tiny_chat, cache) == 1  # an existing cache is never overwritten
    assert "expected a new or empty folder" in capsys.readouterr().err
    cases = [
        (["--teacher_cache", cache, "--max_seq_len", "32"], "the cache was built with: data"),
        (["--teacher_cache", cache, "--top_k", "9"], "--top_k <= 8"),
        (["--teacher_cache", cache, "--divergence", "reverse_kl"], "needs --temperature 1"),  # T=2 in the argv
        (["--teacher_cache", cache, "--teacher", tiny_teacher_dir], "an ensemble needs every logit of each member"),
        (["--teacher_cache", tmp_path], "cache.json"),
    ]
    for extra, message in cases:
        argv = _distill_argv(tiny_chat, tmp_path / "run", *extra)
        assert main(["distill", *argv]) == 1, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "run").exists()  # nothing was trained

    from transformers import AutoTokenizer

    from lmdistill.data import load_examples
    from lmdistill.teachers import TeacherCache

    opened = TeacherCache(cache)
    examples = list(load_examples(tiny_chat, AutoTokenizer.from_pretrained(opened.tokenizer_dir()), 64))
    opened.check_examples(examples)
    examples[3] = {**examples[3], "input_ids": [examples[3]["input_ids"][0] + 1] + examples[3]["input_ids"][1:]}
    with pytest.raises(LmdistillError, match="example 3 differs"):
        opened.check_examples(examples)


def test_cache_progress_is_plain_lines_off_a_terminal(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    """Off a terminal (a log file, CI) `cache-teacher` prints a line per tenth of the examples, with counts,
    instead of a tqdm bar whose carriage returns pile up into one line."""
    assert _cache(tiny_teacher_dir, tiny_chat, tmp_path / "cache") == 0  # capsys: stderr is not a terminal
    captured = capsys.readouterr()
    assert "cache-teacher" not in captured.err and "\r" not in captured.out  # no bar of ours (transformers may draw its own)
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("cache-teacher: ")]
    assert 3 <= len(lines) <= 11, captured.out
    assert lines[-1].startswith("cache-teacher: 40/40 examples (100%)")
    positions = json.loads((tmp_path / "cache" / "cache.json").read_text())["positions"]
    assert f"{positions:,} positions" in lines[-1]
    done = [int(ln.split()[1].split("/")[0]) for ln in lines]
    assert done == sorted(done) and done[0] < 40


def test_a_cached_run_reports_kl_on_eval_data_cached_with_it(tiny_teacher_dir, tiny_chat, tiny_corpus, tmp_path,
                                                             capsys):
    """`cache-teacher --eval_data` caches the held-out examples too; a run from that cache logs KL/agreement like
    the online teacher at the same top_k (the whole vocabulary here, so exactly the online numbers)."""
    from lmdistill.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(tiny_teacher_dir))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": line}) + "\n" for line in tiny_corpus.read_text().splitlines()[:30]))
    cache = tmp_path / "cache"
    assert _cache(tiny_teacher_dir, tiny_chat, cache, "--eval_data", heldout, "--top_k", vocab) == 0
    assert (cache / "eval" / "cache.json").is_file()
    evals = {}
    for name, teacher in (("cached", ["--teacher_cache", cache]), ("online", ["--teacher", tiny_teacher_dir])):
        out = tmp_path / name
        assert main(["distill", *_distill_argv(tiny_chat, out, *teacher), "--max_steps", "1", "--eval_data", heldout,
                     "--eval_batches", "3"]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        evals[name] = [r for r in rows if r["type"] == "eval"][-1]
    assert evals["cached"]["kl_to_teacher"] == pytest.approx(evals["online"]["kl_to_teacher"], rel=1e-4)
    assert evals["cached"]["agreement"] == evals["online"]["agreement"]
    # without the held-out part, the run says why it reports no KL
    bare = tmp_path / "bare_cache"
    assert _cache(tiny_teacher_dir, tiny_chat, bare) == 0
    capsys.readouterr()
    assert main(["distill", *_distill_argv(tiny_chat, tmp_path / "bare", "--teacher_cache", bare), "--max_steps", "1",
                 "--eval_data", heldout]) == 0
    assert "holds no scores for --eval_data" in capsys.readouterr().out
