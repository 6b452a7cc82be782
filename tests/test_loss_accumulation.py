"""The fused loss under gradient accumulation (`loss_scale`: the weight gradient goes straight into an existing
.grad, no second [V, H] buffer) and with heads that scale or softcap their logits (Cohere, Granite, Gemma 2/3):
exact against float64 references, on values and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmdistill.errors import LmdistillError
from lmdistill.losses import distillation_loss, fused_cross_entropy_parts, fused_distillation_loss
from lmdistill.losses.functional import fused_teacher_distillation_loss_parts
from lmdistill.losses.scores import ProjectedScores

N, H, HT, V = 13, 8, 6, 50
OPTIONS = {"alpha": 0.3, "temperature": 2.0, "reduction": "sum"}


def _inputs(seed=0, batches=3):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(batches, N, H, generator=g, dtype=torch.float64)
    ht = torch.randn(batches, N, HT, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    Wt = torch.randn(V, HT, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (batches, N), generator=g)
    labels[0, :4] = -100
    return hs, ht, W, Wt, labels


class FreshTensors(TorchDispatchMode):
    """Counts new tensors of one shape made by any op (outputs that share no storage with an input: not views, not
    in-place results), in forward and backward: how many [V, H] buffers a step allocates."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.count += sum(1 for t in tree_leaves(out) if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape
                          and t.untyped_storage().data_ptr() not in inputs)
        return out


def _head_logits(z, scale=1.0, cap=None):
    z = z * scale
    return cap * torch.tanh(z / cap) if cap else z


def _reference_grads(hs, ht, W, Wt, labels, scale, **head):
    """d(sum_i scale * loss_i)/dW through full float64 logits and autograd."""
    W = W.detach().clone().requires_grad_(True)
    for i in range(len(hs)):
        zs = _head_logits(hs[i] @ W.T, head.get("student_logit_scale", 1.0), head.get("student_softcap"))
        zt = _head_logits(ht[i] @ Wt.T, head.get("teacher_logit_scale", 1.0), head.get("teacher_softcap"))
        (distillation_loss(zs, zt, labels[i], **OPTIONS) * scale).backward()
    return W.grad


@pytest.mark.parametrize("chunk", [4, 64])
def test_later_micro_batches_add_into_the_existing_grad_exactly_and_in_place(chunk):
    hs, ht, W, Wt, labels = _inputs()
    expected = _reference_grads(hs, ht, W, Wt, labels, 0.5)
    storage, fresh = [], []
    for i in range(len(hs)):
        with FreshTensors(W.shape) as mode:
            loss = fused_distillation_loss(hs[i], W, ht[i], Wt, labels[i], loss_scale=0.5, chunk_size=chunk,
                                           **OPTIONS)
            before = None if W.grad is None else W.grad.data_ptr()
            loss.backward()
        storage.append((before, W.grad.data_ptr()))
        fresh.append(mode.count)
    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)
    # the first micro-batch makes the gradient buffer; later ones add into .grad (no second [V, H] buffer) and
    # autograd adopts it back (same storage)
    assert fresh == [1, 0, 0]
    assert all(before == after for before, after in storage[1:])
    W.grad = torch.zeros_like(W)
    with FreshTensors(W.shape) as mode:  # without loss_scale: a new [V, H] gradient that autograd adds into .grad
        fused_distillation_loss(hs[0], W, ht[0], Wt, labels[0], **OPTIONS).backward()
    assert mode.count == 1


def test_loss_scale_scales_the_loss_and_every_gradient():
    hs, ht, W, Wt, labels = _inputs(batches=1)
    h = hs[0].clone().requires_grad_(True)
    plain = fused_distillation_loss(h, W, ht[0], Wt, labels[0], **OPTIONS)
    plain.backward()
    g_h, g_W = h.grad.clone(), W.grad.clone()
    h.grad = None
    W.grad = torch.zeros_like(W)  # in place from the start
    scaled = fused_distillation_loss(h, W, ht[0], Wt, labels[0], loss_scale=0.25, **OPTIONS)
    scaled.backward()
    torch.testing.assert_close(scaled, plain * 0.25, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.grad, g_h * 0.25, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(W.grad, g_W * 0.25, rtol=1e-12, atol=1e-14)


def test_an_incoming_gradient_other_than_one_is_exact_and_warns():
    hs, ht, W, Wt, labels = _inputs()
    expected = _reference_grads(hs, ht, W, Wt, labels, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(len(hs)):
            loss = fused_distillation_loss(hs[i], W, ht[i], Wt, labels[i], loss_scale=0.125, chunk_size=5, **OPTIONS)
            (loss * 4).backward()
    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)
    assert any("recomputed" in str(w.message) for w in caught)


def test_second_backward_through_a_retained_graph_is_exact():
    hs, ht, W, Wt, labels = _inputs(batches=1)
    W.grad = torch.zeros_like(W)
    loss = fused_distillation_loss(hs[0], W, ht[0], Wt, labels[0], loss_scale=1.0, chunk_size=5, **OPTIONS)
    loss.backward(retain_graph=True)
    loss.backward()
    expected = _reference_grads(hs, ht, W, Wt, labels, 2.0)
    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)


def test_two_fused_losses_in_one_graph_share_the_grad_correctly():
    hs, ht, W, Wt, labels = _inputs(batches=2)
    expected = _reference_grads(hs, ht, W, Wt, labels, 1.0) * 2  # two passes below, each the sum of both
    W.grad = torch.zeros_like(W)
    for _ in range(2):
        total = sum(fused_distillation_loss(hs[i], W, ht[i], Wt, labels[i], loss_scale=1.0, chunk_size=5, **OPTIONS)
                    for i in range(2))
        total.backward()
    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)


def test_replacing_the_grad_between_forward_and_backward_is_an_error():
    hs, ht, W, Wt, labels = _inputs(batches=1)
    W.grad = torch.zeros_like(W)
    loss = fused_distillation_loss(hs[0], W, ht[0], Wt, labels[0], loss_scale=1.0, **OPTIONS)
    W.grad = torch.zeros_like(W)
    with pytest.raises(LmdistillError, match="replaced between"):
        loss.backward()


def test_cross_entropy_and_teacher_scores_accumulate_in_place_too():
    hs, ht, W, Wt, labels = _inputs()
    Wr = W.detach().clone().requires_grad_(True)
    for i in range(len(hs)):
        torch.nn.functional.cross_entropy(hs[i] @ Wr.T, labels[i], reduction="sum").mul(0.5).backward()
    for i in range(len(hs)):
        fused_cross_entropy_parts(hs[i], W, labels[i], reduction="sum", loss_scale=0.5).loss.backward()
    torch.testing.assert_close(W.grad, Wr.grad, rtol=1e-12, atol=1e-12)

    expected = _reference_grads(hs, ht, W, Wt, labels, 0.5)
    W.grad = None
    for i in range(len(hs)):
        scores = ProjectedScores(ht[i], Wt, None, V)
        fused_teacher_distillation_loss_parts(hs[i], W, scores, labels[i], loss_scale=0.5, chunk_size=6,
                                              **OPTIONS).loss.backward()
    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)


def test_fp32_accumulation_matches_and_low_precision_grads_take_the_usual_path():
    hs, ht, W, Wt, labels = _inputs()
    expected = _reference_grads(hs, ht, W, Wt, labels, 1.0)
    W32 = W.detach().float().requires_grad_(True)
    for i in range(len(hs)):
        fused_distillation_loss(hs[i].float(), W32, ht[i].float(), Wt.float(), labels[i], loss_scale=1.0,
                                **OPTIONS).backward()
    torch.testing.assert_close(W32.grad.double(), expected, rtol=1e-4, atol=1e-5)
    Wb = W.detach().bfloat16().requires_grad_(True)
    Wb.grad = torch.zeros_like(Wb)
    fused_distillation_loss(hs[0].bfloat16(), Wb, ht[0].bfloat16(), Wt.bfloat16(), labels[0], loss_scale=1.0,
                            **OPTIONS).backward()
    assert Wb.grad.dtype == torch.bfloat16 and Wb.grad.abs().sum() > 0


# -- heads that scale or softcap their logits -------------------------------------------------------------------
HEADS = [
    {"student_logit_scale": 0.7},  # Cohere logit_scale
    {"student_logit_scale": 1 / 4.0, "teacher_logit_scale": 1 / 8.0},  # Granite logits_scaling (divide)
    {"student_softcap": 3.0, "teacher_softcap": 2.0},  # Gemma 2/3 final_logit_softcapping
    {"student_softcap": 3.0, "student_logit_scale": 0.7, "teacher_softcap": 2.0, "teacher_logit_scale": 1.3},
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("divergence,top_k", [("forward_kl", None), ("reverse_kl", None), ("jsd", 7),
                                              ("skew_reverse_kl", 5), ("tvd", None)])
def test_scaled_and_softcapped_heads_are_exact_in_value_and_gradient(head, divergence, top_k):
    hs, ht, W, Wt, labels = _inputs(batches=1)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    opts = {**OPTIONS, "divergence": divergence, "top_k": top_k}
    h = hs[0].clone().requires_grad_(True)
    zs = _head_logits(h @ W.T + b, head.get("student_logit_scale", 1.0), head.get("student_softcap"))
    zt = _head_logits(ht[0] @ Wt.T, head.get("teacher_logit_scale", 1.0), head.get("teacher_softcap"))
    ref = distillation_loss(zs, zt, labels[0], **opts)
    ref_grads = torch.autograd.grad(ref, (h, W, b))
    h2 = hs[0].clone().requires_grad_(True)
    got = fused_distillation_loss(h2, W, ht[0], Wt, labels[0], student_lm_head_bias=b, chunk_size=4, **head, **opts)
    got_grads = torch.autograd.grad(got, (h2, W, b))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_softcapped_cross_entropy_passes_gradcheck():
    hs, _, W, _, labels = _inputs(batches=1)
    h = hs[0].clone().requires_grad_(True)
    fn = lambda h, W: fused_cross_entropy_parts(h, W, labels[0], softcap=2.5, logit_scale=0.9,  # noqa: E731
                                                chunk_size=3).loss
    assert torch.autograd.gradcheck(fn, (h, W))


@pytest.mark.parametrize("bad", [{"student_softcap": 0.0 - 1}, {"student_logit_scale": float("nan")},
                                 {"teacher_softcap": float("inf")}, {"loss_scale": float("nan")}])
def test_bad_head_options_name_the_option(bad):
    hs, ht, W, Wt, labels = _inputs(batches=1)
    with pytest.raises(LmdistillError, match=next(iter(bad))):
        fused_distillation_loss(hs[0], W, ht[0], Wt, labels[0], **bad)


# -- through the training loop ------------------------------------------------------------------------------------
def _gemma2(tmp_path, tokenizer_dir, name, hidden, softcap, seed):
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Gemma2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                          final_logit_softcapping=softcap, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    out = tmp_path / name
    Gemma2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_softcapped_gemma2_pair_distills_with_the_models_own_logits(tiny_tokenizer_dir, tiny_chat, tmp_path):
    """Gemma 2 softcaps its logits in forward(); the fused loss in the loop equals the loss on the models' logits."""
    from train_args import make_plan

    from lmdistill.data import IGNORE_INDEX
    from lmdistill.train.loop import Trainer

    teacher = _gemma2(tmp_path, tiny_tokenizer_dir, "teacher", 32, 4.0, 0)
    student = _gemma2(tmp_path, tiny_tokenizer_dir, "student", 16, 2.0, 1)
    trainer = Trainer(make_plan("distill", ["--teacher", str(teacher), "--student", str(student), "--data",
                                            str(tiny_chat), "--output_dir", str(tmp_path / "run"), "--max_seq_len",
                                            "48", "--batch_size", "2", "--temperature", "2.0", "--alpha", "0.3"]))
    batch = trainer.micro_batches(0)[0]
    parts, _ = trainer.micro_loss(batch)
    model, tmodel = trainer.model, trainer.teacher.model
    with torch.no_grad():
        zs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        zt = tmodel(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert zs.abs().max() <= 2.0 and zt.abs().max() <= 4.0  # the caps are in the models' own logits
    labels = torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], IGNORE_INDEX)], 1)
    ref = distillation_loss(zs, zt, labels, temperature=2.0, alpha=0.3, reduction="sum")
    torch.testing.assert_close(parts.loss.detach(), ref, rtol=1e-5, atol=1e-5)
    assert trainer.step()["loss"] > 0  # a whole optimizer step runs


def test_the_loop_accumulates_the_lm_head_gradient_in_place(tiny_teacher_dir, tiny_chat, tmp_path):
    """Later micro-batches add into the tied embedding's .grad (same storage), and the result equals one big batch
    (tests/test_train.py checks 1 x 8 == 8 x 1 on every parameter)."""
    from train_args import make_plan

    from lmdistill.train.loop import Trainer

    argv = ["--teacher", str(tiny_teacher_dir), "--student", "nano", "--hidden_size", "32", "--num_layers", "1",
            "--data", str(tiny_chat), "--output_dir", str(tmp_path / "run"), "--max_seq_len", "64",
            "--batch_size", "1", "--accumulation_steps", "3"]
    trainer = Trainer(make_plan("distill", argv))
    W = trainer.model.lm_head.weight
    assert W is trainer.model.model.embed_tokens.weight  # tied
    batches = trainer.micro_batches(0)
    counts = []
    for b in batches:  # one micro-batch at a time (accumulate normalizes by the step's tokens; the same here)
        with FreshTensors(W.shape) as mode:
            trainer.accumulate([b])
        counts.append(mode.count)
    # first: the loss's weight gradient + the embedding's; later: the embedding's only (the loss adds into .grad)
    assert counts[0] == counts[1] + 1 and counts[1] == counts[2]


# -- CUDA's low-precision GEMMs (tensor cores, fp32 out), emulated on CPU -------------------------------------------
def test_low_precision_matmul_operands_keep_fp32_logits_and_round_only_the_operands(monkeypatch):
    """On CUDA under autocast or with bf16 weights, the loss's GEMMs take bf16 operands with fp32 accumulation and
    output (`matmul_dtype`). Emulated here: the loss value equals the fp32 loss of bf16-rounded inputs (the products
    are exact), and gradients differ from fp32 ones only by the bf16 rounding of the logit gradient."""
    from lmdistill.losses import functional, scores

    for module in (functional, scores):  # the student's GEMMs (the loss) and the teacher's (its scores)
        monkeypatch.setattr(module, "matmul_dtype", lambda device, weight: torch.bfloat16)
    hs, ht, W, Wt, labels = _inputs(batches=2)
    hs, ht, Wt = hs.float(), ht.float(), Wt.float()
    W = W.detach().float().requires_grad_(True)
    r = lambda x: x.bfloat16().double()  # noqa: E731  (what the GEMM sees)
    Wr = r(W.detach()).requires_grad_(True)
    ref = distillation_loss(r(hs[0]) @ Wr.T, r(ht[0]) @ r(Wt).T, labels[0], **OPTIONS)
    ref.backward()
    loss = fused_distillation_loss(hs[0], W, ht[0], Wt, labels[0], chunk_size=4, **OPTIONS)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad.double(), Wr.grad, rtol=2e-2, atol=2e-2 * float(Wr.grad.abs().max()))
    # later micro-batches in place, with a loss scale (the tiled add path)
    first = W.grad.clone()
    loss2 = fused_distillation_loss(hs[1], W, ht[1], Wt, labels[1], chunk_size=4, loss_scale=0.5, **OPTIONS)
    loss2.backward()
    Wr.grad = None
    (distillation_loss(r(hs[1]) @ Wr.T, r(ht[1]) @ r(Wt).T, labels[1], **OPTIONS) * 0.5).backward()
    torch.testing.assert_close((W.grad - first).double(), Wr.grad, rtol=2e-2, atol=2e-2 * float(Wr.grad.abs().max()))


def test_matmul_dtype_is_fp32_on_cpu_and_follows_autocast_or_weights_on_cuda():
    from lmdistill.losses.projection import matmul_dtype

    W32, W16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16)
    assert matmul_dtype(torch.device("cpu"), W16) is None and matmul_dtype(torch.device("cpu"), W32) is None
    assert matmul_dtype(torch.device("cuda"), W16) == torch.bfloat16
    assert matmul_dtype(torch.device("cuda"), W32) is None


def test_chunk_budget_on_cuda_follows_free_memory_and_cpu_keeps_its_default():
    from lmdistill.losses.functional import (DEFAULT_CHUNK_BUDGET_BYTES, MAX_CHUNK_BUDGET_BYTES, MAX_CHUNK_TOKENS,
                                             MAX_CHUNK_TOKENS_CUDA, auto_chunk_size, chunk_budget)

    GiB, V = 2**30, 151_936
    assert chunk_budget("cpu") == chunk_budget(None) == (DEFAULT_CHUNK_BUDGET_BYTES, MAX_CHUNK_TOKENS)
    assert chunk_budget("cuda", free_bytes=130 * GiB) == (MAX_CHUNK_BUDGET_BYTES, MAX_CHUNK_TOKENS_CUDA)  # an H200
    assert chunk_budget("cuda", free_bytes=16 * GiB)[0] == GiB  # 1/16 of what is free
    assert chunk_budget("cuda", free_bytes=2 * GiB)[0] == DEFAULT_CHUNK_BUDGET_BYTES  # never below the CPU default...
    assert chunk_budget("cuda", free_bytes=400 * 2**20)[0] == 100 * 2**20  # ...unless that is more than a quarter
    cpu, big = auto_chunk_size(V, 8192), auto_chunk_size(V, 8192, device="cuda", free_bytes=130 * GiB)
    assert cpu == 256 and big == 2731 and 2 * V * 4 * big <= MAX_CHUNK_BUDGET_BYTES  # 3 chunks of 2,731 rows, 3.1 GiB
    assert auto_chunk_size(V, 8192, device="cuda", free_bytes=2 * GiB) * 2 * V * 4 <= DEFAULT_CHUNK_BUDGET_BYTES
