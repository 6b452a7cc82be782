"""The lean decode loop: greedy replies identical to `transformers`' `generate`, and its sampler's truncations."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.models import load_model
from lmdistill.models.decode import sample_next
from lmdistill.models.generation import generate_replies
from lmdistill.tokenizer import load_tokenizer


@pytest.mark.parametrize("stop_often", [False, True], ids=["to max_new_tokens", "early stops"])
def test_greedy_replies_equal_generate(tiny_teacher_dir, stop_often):
    tok = load_tokenizer(tiny_teacher_dir)
    torch.manual_seed(0)
    model = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=2, verbose=False)
    prompts = [list(range(5, 5 + n)) + [40 + n] for n in (1, 3, 6, 2, 9)]  # different lengths: left padding
    stops = None
    if stop_often:  # stop on tokens the model does produce, so rows finish at different steps
        first = generate_replies(model, tok, prompts, max_new_tokens=12, backend="hf", progress=False)
        stops = sorted({r.token_ids[2] for r in first} | {tok.eos_token_id})
    hf = generate_replies(model, tok, prompts, max_new_tokens=12, batch_size=5, eos_token_ids=stops,
                          backend="hf", progress=False)
    lean = generate_replies(model, tok, prompts, max_new_tokens=12, batch_size=5, eos_token_ids=stops,
                            backend="lean", progress=False)
    assert lean == hf
    assert any(r.finished for r in hf) == stop_often


def test_the_sampler_truncates_as_generate_does():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
    assert sample_next(logits, 0.0, 0, 1.0).eq(1).all()
    assert sample_next(logits, 1.0, 1, 1.0).eq(1).all()  # top_k 1 is greedy
    assert sample_next(logits, 1.0, 0, 1e-6).eq(1).all()  # a tiny nucleus keeps only the most likely token
    top2 = sample_next(logits, 1.0, 2, 1.0)
    assert set(top2.tolist()) == {1, 2}
    assert (top2 == 1).float().mean().item() == pytest.approx(torch.tensor([2.0, 1.0]).softmax(0)[0].item(), abs=0.03)
    p = torch.tensor([0.0, 2.0, 1.0, -1.0]).softmax(0)  # nucleus 0.8: tokens 1 and 2 (0.66 + 0.24 >= 0.8)
    nucleus = sample_next(logits, 1.0, 0, 0.8)
    assert set(nucleus.tolist()) == {1, 2}
    assert (nucleus == 1).float().mean().item() == pytest.approx((p[1] / (p[1] + p[2])).item(), abs=0.03)
    hot = sample_next(logits, 4.0, 0, 1.0)
    assert len(set(hot.tolist())) == 4  # a high temperature reaches every token


@pytest.mark.parametrize("scale", [8.0, 0.1], ids=["nucleus within the top 64", "flat: whole-row sort"])
def test_nucleus_sampling_matches_the_sorted_reference(scale):
    """Both paths of the top-p sampler (partial sort of the top 64, or the whole row) keep exactly the nucleus and
    sample it in proportion."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=g) * scale
    p = logits.softmax(-1)[0].double()
    sorted_p, order = p.sort(descending=True)
    keep = order[(sorted_p.cumsum(0) - sorted_p) < 0.9]
    want = torch.zeros_like(p)
    want[keep] = p[keep] / p[keep].sum()
    torch.manual_seed(1)
    n = 40000
    tokens = sample_next(logits.repeat(n, 1), 1.0, 0, 0.9)
    freq = torch.bincount(tokens, minlength=300).double() / n
    assert set(tokens.unique().tolist()) <= set(keep.tolist())
    assert (freq - want).abs().max() < 5 * math.sqrt(0.25 / n)
    assert (len(keep) < 64) == (scale == 8.0)  # each case exercises the path it names


def test_the_sampler_draws_in_proportion():
    torch.manual_seed(3)
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, -30.0]]).repeat(50000, 1)
    freq = torch.bincount(sample_next(logits, 1.0, 0, 1.0), minlength=5).double() / 50000
    torch.testing.assert_close(freq, logits[0].softmax(0).double(), atol=0.01, rtol=0)
    assert freq[4] == 0  # a token of probability ~1e-13 is not drawn
