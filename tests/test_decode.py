"""The lean decode loop: greedy replies identical to `transformers`' `generate`, and its sampler's truncations."""

from __future__ import annotations

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
