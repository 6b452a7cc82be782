"""The loss engine against a float64 reference written from the formulas in DESIGN.md ("Loss contract")."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lmdistill.errors import LmdistillError
from lmdistill.losses import distillation_loss, distillation_loss_parts, fused_distillation_loss

DIVS = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd"]


def _d(P, Q, div, lam, beta):
    """D(P || Q) per row from the contract's formulas; P, Q [N, K] probabilities."""
    kl = lambda a, b: (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)  # noqa: E731
    if div == "forward_kl":
        return kl(P, Q)
    if div == "reverse_kl":
        return kl(Q, P)
    if div == "skew_forward_kl":
        return kl(P, lam * P + (1 - lam) * Q)
    if div == "skew_reverse_kl":
        return kl(Q, (1 - lam) * P + lam * Q)
    if div == "jsd":
        M = beta * P + (1 - beta) * Q
        return beta * kl(P, M) + (1 - beta) * kl(Q, M)
    return 0.5 * (P - Q).abs().sum(-1)


def reference(zs, zt, labels, div="forward_kl", T=1.0, alpha=0.0, lam=0.1, beta=0.5, top_k=None, reduction="mean"):
    """The contract, in float64 with plain autograd over full logits."""
    zs, zt = zs.double(), zt.double().detach()
    mask = labels != -100
    zs_m, zt_m = zs[mask], zt[mask]
    Q = torch.softmax(zs_m / T, -1)
    if top_k is None:
        P = torch.softmax(zt_m / T, -1)
    else:
        vals, idx = zt_m.topk(top_k, -1)
        if div == "reverse_kl":  # tail bucket: k tokens + the rest of each side's mass
            p_k = torch.softmax(zt_m / T, -1).gather(-1, idx)
            q_k = Q.gather(-1, idx)
            P = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
            Q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
        else:
            P = torch.zeros_like(Q).scatter(-1, idx, torch.softmax(vals / T, -1))
    kd = _d(P, Q, div, lam, beta).sum()
    ce = F.cross_entropy(zs_m, labels[mask], reduction="sum")
    total = alpha * ce + (1 - alpha) * T**2 * kd
    n = int(mask.sum())
    return total / n if reduction == "mean" and n else total


def _inputs(n=11, V=13, H=6, Ht=9, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, H, generator=g, dtype=dtype)
    Ws = torch.randn(V, H, generator=g, dtype=dtype) * scale / H**0.5
    ht = torch.randn(n, Ht, generator=g, dtype=dtype)
    Wt = torch.randn(V, Ht, generator=g, dtype=dtype) * scale / Ht**0.5
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    labels[0] = 1  # at least one trained position
    return hs, Ws, ht, Wt, labels


CASES = list(itertools.product(DIVS, [1.0, 2.5], [0.0, 0.4], [None, 4]))


@pytest.mark.parametrize("div,T,alpha,top_k", CASES)
def test_logits_loss_matches_reference_values_and_gradients(div, T, alpha, top_k):
    hs, Ws, ht, Wt, labels = _inputs(n=11, V=13)
    zs = (hs @ Ws.T).requires_grad_()
    zt = ht @ Wt.T
    kw = dict(divergence=div, temperature=T, alpha=alpha, top_k=top_k, skew_lambda=0.2, jsd_beta=0.3)
    ours = distillation_loss(zs, zt, labels, chunk_size=4, **kw)
    (g_ours,) = torch.autograd.grad(ours, zs)
    zs_r = zs.detach().clone().requires_grad_()
    ref = reference(zs_r, zt, labels, div, T, alpha, 0.2, 0.3, top_k)
    (g_ref,) = torch.autograd.grad(ref, zs_r)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("div,T,alpha,top_k", CASES)
def test_fused_matches_reference_values_and_gradients(div, T, alpha, top_k):
    hs, Ws, ht, Wt, labels = _inputs(n=11, V=13, seed=1)
    hs.requires_grad_(), Ws.requires_grad_()
    kw = dict(divergence=div, temperature=T, alpha=alpha, top_k=top_k, skew_lambda=0.2, jsd_beta=0.3)
    ours = fused_distillation_loss(hs, Ws, ht, Wt, labels, chunk_size=3, **kw)  # 3 does not divide 8 rows
    g_ours = torch.autograd.grad(ours, (hs, Ws))
    ref = reference(hs @ Ws.T, ht @ Wt.T, labels, div, T, alpha, 0.2, 0.3, top_k)
    g_ref = torch.autograd.grad(ref, (hs, Ws))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("div,T,alpha,top_k", [("forward_kl", 1.0, 0.0, None), ("reverse_kl", 2.0, 0.3, 4)])
def test_fused_cpu_vocab_tiles_match_reference(monkeypatch, div, T, alpha, top_k):
    """The CPU path for large lm_heads (transposed products per vocabulary tile), forced on small sizes with
    tiles that do not divide the vocabulary."""
    from lmdistill.losses import projection

    monkeypatch.setattr(projection, "WEIGHT_TILE_BYTES", 8 * 6)  # any weight above 48 bytes takes the tiled path
    monkeypatch.setattr(projection, "CPU_TILE_BYTES", 8 * 3 * 2)  # 3-token chunks -> 2 vocabulary rows per tile
    hs, Ws, ht, Wt, labels = _inputs(n=11, V=13, seed=7)
    hs.requires_grad_(), Ws.requires_grad_()
    kw = dict(divergence=div, temperature=T, alpha=alpha, top_k=top_k)
    ours = fused_distillation_loss(hs, Ws, ht, Wt, labels, chunk_size=3, **kw)
    g_ours = torch.autograd.grad(ours, (hs, Ws))
    ref = reference(hs @ Ws.T, ht @ Wt.T, labels, div, T, alpha, top_k=top_k)
    g_ref = torch.autograd.grad(ref, (hs, Ws))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("top_k", [None, 3])
def test_gradcheck_both_apis(div, top_k):
    hs, Ws, ht, Wt, labels = _inputs(n=5, V=7, H=4, Ht=5, seed=2)
    kw = dict(divergence=div, temperature=1.5, alpha=0.3, top_k=top_k)
    zt = ht @ Wt.T
    zs = (hs @ Ws.T).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: distillation_loss(z, zt, labels, **kw), (zs,))
    hs.requires_grad_(), Ws.requires_grad_()
    f = lambda h, w: fused_distillation_loss(h, w, ht, Wt, labels, chunk_size=2, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (hs, Ws))


def test_fused_equals_unfused_with_bias_and_3d_shapes():
    hs, Ws, ht, Wt, labels = _inputs(n=12, V=17, seed=3)
    bs = torch.randn(17, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(17, dtype=torch.float64)
    hs3, ht3, lab3 = hs.view(3, 4, -1).requires_grad_(), ht.view(3, 4, -1), labels.view(3, 4)
    Ws.requires_grad_()
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.5, top_k=5)
    fused = fused_distillation_loss(hs3, Ws, ht3, Wt, lab3, student_lm_head_bias=bs, teacher_lm_head_bias=bt,
                                    chunk_size=5, **kw)
    gf = torch.autograd.grad(fused, (hs3, Ws, bs))
    plain = distillation_loss(hs3 @ Ws.T + bs, ht3 @ Wt.T + bt, lab3, **kw)
    gp = torch.autograd.grad(plain, (hs3, Ws, bs))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("div", DIVS)
def test_zero_for_identical_and_nonnegative(div):
    hs, Ws, ht, Wt, labels = _inputs(seed=4)
    z = hs @ Ws.T
    assert distillation_loss(z, z, labels, divergence=div, temperature=2.0).abs() < 1e-12
    for seed in range(5):
        hs, Ws, ht, Wt, labels = _inputs(seed=10 + seed)
        assert distillation_loss(hs @ Ws.T, ht @ Wt.T, labels, divergence=div, top_k=3) >= 0


def test_jsd_half_is_symmetric():
    hs, Ws, ht, Wt, labels = _inputs(seed=5)
    a, b = hs @ Ws.T, ht @ Wt.T
    torch.testing.assert_close(distillation_loss(a, b, labels, divergence="jsd", jsd_beta=0.5),
                               distillation_loss(b, a, labels, divergence="jsd", jsd_beta=0.5))


def test_skew_lambda_zero_is_plain_kl_and_aliases():
    hs, Ws, ht, Wt, labels = _inputs(seed=6)
    a, b = hs @ Ws.T, ht @ Wt.T
    for skew, plain in [("sfkl", "fkl"), ("srkl", "rkl")]:
        torch.testing.assert_close(distillation_loss(a, b, labels, divergence=skew, skew_lambda=0.0),
                                   distillation_loss(a, b, labels, divergence=plain))


@pytest.mark.parametrize("div", DIVS)
def test_top_k_equal_to_vocab_is_no_truncation(div):
    hs, Ws, ht, Wt, labels = _inputs(V=13, seed=7)
    a, b = (hs @ Ws.T).requires_grad_(), ht @ Wt.T
    full = distillation_loss(a, b, labels, divergence=div)
    topv = distillation_loss(a, b, labels, divergence=div, top_k=13)
    torch.testing.assert_close(full, topv)
    torch.testing.assert_close(*(torch.autograd.grad(x, a)[0] for x in (full, topv)))


def test_reverse_kl_tail_bucket_is_finite_and_exact_at_k_below_vocab():
    hs, Ws, ht, Wt, labels = _inputs(V=50, seed=8)
    a, b = (hs @ Ws.T).requires_grad_(), ht @ Wt.T
    loss = distillation_loss(a, b, labels, divergence="reverse_kl", top_k=1)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, reference(a, b, labels, "reverse_kl", top_k=1))


def test_sum_reduction_and_parts():
    hs, Ws, ht, Wt, labels = _inputs(seed=9)
    a, b = hs @ Ws.T, ht @ Wt.T
    n = int((labels != -100).sum())
    mean = distillation_loss(a, b, labels, alpha=0.5, temperature=2.0)
    parts = distillation_loss_parts(a, b, labels, alpha=0.5, temperature=2.0, reduction="sum")
    torch.testing.assert_close(parts.loss, mean * n)
    assert parts.n_tokens == n
    torch.testing.assert_close(torch.tensor(0.5 * parts.ce_sum + 0.5 * 4.0 * parts.kd_sum, dtype=torch.float64),
                               parts.loss.detach())


def test_all_positions_ignored_gives_zero_with_zero_gradient():
    hs, Ws, ht, Wt, _ = _inputs(seed=10)
    labels = torch.full((hs.shape[0],), -100)
    hs.requires_grad_(), Ws.requires_grad_()
    loss = fused_distillation_loss(hs, Ws, ht, Wt, labels, alpha=0.5)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert hs.grad.abs().sum() == 0 and Ws.grad.abs().sum() == 0
    z = (hs @ Ws.T).detach().requires_grad_()
    loss = distillation_loss(z, ht @ Wt.T, labels)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().sum() == 0


def test_bf16_inputs_do_not_round_logits():
    hs, Ws, ht, Wt, labels = _inputs(n=16, V=300, H=32, Ht=48, seed=11, dtype=torch.float32, scale=8.0)
    hs, Ws, ht, Wt = (x.bfloat16() for x in (hs, Ws, ht, Wt))
    hs.requires_grad_(), Ws.requires_grad_()
    loss = fused_distillation_loss(hs, Ws, ht, Wt, labels, alpha=0.3, temperature=2.0, chunk_size=5)
    gh, gw = torch.autograd.grad(loss, (hs, Ws))
    h64, w64 = hs.detach().double().requires_grad_(), Ws.detach().double().requires_grad_()
    ref = reference(h64 @ w64.T, ht.double() @ Wt.double().T, labels, alpha=0.3, T=2.0)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())  # bf16-rounded logits miss by ~1e-2
    torch.testing.assert_close(gh.double(), rh, rtol=2e-2, atol=1e-3)  # only the final cast to bf16 rounds
    torch.testing.assert_close(gw.double(), rw, rtol=2e-2, atol=1e-3)


def test_padded_vocab_compares_real_tokens_only():
    hs, Ws, ht, Wt, labels = _inputs(V=13, seed=12)
    Wt_pad = torch.cat([Wt, torch.randn(3, Wt.shape[1], dtype=Wt.dtype) * 10])  # padded rows, huge logits
    Ws.requires_grad_()
    with pytest.raises(LmdistillError, match="vocab_size=len"):
        fused_distillation_loss(hs, Ws, ht, Wt_pad, labels)
    loss = fused_distillation_loss(hs, Ws, ht, Wt_pad, labels, vocab_size=13)
    torch.testing.assert_close(loss, fused_distillation_loss(hs, Ws, ht, Wt, labels))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(divergence="kl_div"), "Valid names: forward_kl"),
        (dict(temperature=0.0), "temperature: expected > 0"),
        (dict(alpha=1.5), r"alpha: expected in \[0, 1\]"),
        (dict(top_k=0), "top_k: expected None or an integer >= 1"),
        (dict(reduction="none"), "reduction"),
        (dict(jsd_beta=0.0, divergence="jsd"), "jsd_beta"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    hs, Ws, ht, Wt, labels = _inputs()
    with pytest.raises(LmdistillError, match=match):
        distillation_loss(hs @ Ws.T, ht @ Wt.T, labels, **kwargs)


def test_shape_errors_say_which():
    hs, Ws, ht, Wt, labels = _inputs()
    with pytest.raises(LmdistillError, match="student_logits"):
        distillation_loss(hs @ Ws.T, ht @ Wt.T, labels[:-1])
    with pytest.raises(LmdistillError, match=r"teacher_lm_head_weight of shape \[vocab, 9\]"):
        fused_distillation_loss(hs, Ws, ht, Wt[:, :-1], labels)
    with pytest.raises(LmdistillError, match="labels: expected token ids"):
        bad = labels.clone()
        bad[0] = 99
        distillation_loss(hs @ Ws.T, ht @ Wt.T, bad, alpha=0.5)


def test_fused_cross_entropy_matches_f_cross_entropy():
    from lmdistill.losses import fused_cross_entropy_parts

    hs, Ws, _, _, labels = _inputs(n=11, V=13, seed=13)
    hs.requires_grad_(), Ws.requires_grad_()
    parts = fused_cross_entropy_parts(hs, Ws, labels, chunk_size=4)
    ref = F.cross_entropy(hs @ Ws.T, labels)
    torch.testing.assert_close(parts.loss, ref)
    for a, b in zip(torch.autograd.grad(parts.loss, (hs, Ws)), torch.autograd.grad(ref, (hs, Ws))):
        torch.testing.assert_close(a, b)
    assert parts.n_tokens == int((labels != -100).sum()) and parts.kd_sum == 0.0


def test_fused_is_fp32_under_bf16_autocast():
    hs, Ws, ht, Wt, labels = _inputs(n=16, V=300, H=32, Ht=48, seed=14, dtype=torch.float32, scale=8.0)
    Ws.requires_grad_()
    plain = fused_distillation_loss(hs, Ws, ht, Wt, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = fused_distillation_loss(hs, Ws, ht, Wt, labels)
    torch.testing.assert_close(amp, plain, rtol=1e-6, atol=1e-6)


def test_fused_padded_student_rows_get_zero_gradient():
    hs, Ws, ht, Wt, labels = _inputs(V=13, seed=15)
    Ws_pad = torch.cat([Ws, torch.randn(2, Ws.shape[1], dtype=Ws.dtype)]).requires_grad_()
    loss = fused_distillation_loss(hs, Ws_pad, ht, Wt, labels, vocab_size=13, alpha=0.5)
    loss.backward()
    assert Ws_pad.grad.shape == Ws_pad.shape and Ws_pad.grad[13:].abs().sum() == 0
    ref_w = Ws.detach().clone().requires_grad_()
    fused_distillation_loss(hs, ref_w, ht, Wt, labels, alpha=0.5).backward()
    torch.testing.assert_close(Ws_pad.grad[:13], ref_w.grad)


def test_ce_sum_is_reported_for_logging_when_alpha_is_zero():
    hs, Ws, ht, Wt, labels = _inputs(seed=16)
    parts = distillation_loss_parts(hs @ Ws.T, ht @ Wt.T, labels, temperature=2.0)
    ref = F.cross_entropy(hs @ Ws.T, labels, reduction="sum")
    assert abs(parts.ce_sum - ref.item()) < 1e-9
    torch.testing.assert_close(parts.loss, reference(hs @ Ws.T, ht @ Wt.T, labels, T=2.0))  # CE not in the loss


@pytest.mark.parametrize("div", [d for d in DIVS if d != "reverse_kl"])  # KL(q || p) is +inf where p = 0 < q
@pytest.mark.parametrize("T,alpha", [(1.0, 0.3), (2.0, 0.0)])
def test_teacher_logits_masked_to_minus_inf(div, T, alpha):
    """A teacher that masks tokens (-inf logits, p = 0): finite loss and gradients, 0 log 0 = 0."""
    hs, Ws, ht, Wt, labels = _inputs(seed=17)
    zt = ht @ Wt.T
    zt[:, [2, 5]] = -float("inf")
    zs = (hs @ Ws.T).requires_grad_()
    ours = distillation_loss(zs, zt, labels, divergence=div, temperature=T, alpha=alpha)
    (g,) = torch.autograd.grad(ours, zs)
    zs_r = zs.detach().clone().requires_grad_()
    ref = reference(zs_r, zt, labels, div, T, alpha)
    (g_ref,) = torch.autograd.grad(ref, zs_r)
    assert torch.isfinite(ours) and torch.isfinite(g).all()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_labels_only_mark_positions_when_alpha_is_zero():
    hs, Ws, ht, Wt, labels = _inputs(seed=17)
    marks = torch.where(labels != -100, torch.full_like(labels, 10_000), labels)  # not token ids
    for T in (1.0, 2.0):
        loss = distillation_loss(hs @ Ws.T, ht @ Wt.T, marks, temperature=T)
        torch.testing.assert_close(loss, reference(hs @ Ws.T, ht @ Wt.T, labels, T=T))


@pytest.mark.parametrize("vocab", [13, 6400, 151_936])
@pytest.mark.parametrize("n", [1, 7, 1000, 1024, 4099])
def test_auto_chunk_size_fits_the_budget_in_equal_chunks(vocab, n):
    from lmdistill.losses import auto_chunk_size
    from lmdistill.losses.functional import DEFAULT_CHUNK_BUDGET_BYTES, MAX_CHUNK_TOKENS

    c = auto_chunk_size(vocab, n)
    assert 1 <= c <= MAX_CHUNK_TOKENS and 2 * vocab * 4 * c <= max(DEFAULT_CHUNK_BUDGET_BYTES, 2 * vocab * 4)
    chunks = -(-n // c)
    largest = min(n, MAX_CHUNK_TOKENS, DEFAULT_CHUNK_BUDGET_BYTES // (2 * vocab * 4))
    assert chunks == -(-n // largest)  # no more chunks than the budget needs
    assert n - (chunks - 1) * c >= c - chunks  # the last chunk is not a small remainder


@pytest.mark.parametrize("T,alpha,masked", [(1.0, 0.0, False), (1.0, 0.4, True), (2.5, 0.0, True), (2.5, 0.4, False)])
def test_row_blocks_with_a_shared_scratch_match_reference(monkeypatch, T, alpha, masked):
    """Chunks walked in several row blocks (forced: 2 rows of 13 per block, a last block of 1), with the fast
    forward-KL path's one reused temporary and q written over the teacher's block; -inf teacher logits too."""
    from lmdistill.losses import engine

    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 2 * 13)
    hs, Ws, ht, Wt, labels = _inputs(n=11, V=13, seed=23)
    hs.requires_grad_(), Ws.requires_grad_()
    zt = ht @ Wt.T
    if masked:
        zt[:, [1, 4]] = -float("inf")
    kw = dict(divergence="forward_kl", temperature=T, alpha=alpha)
    ours = fused_distillation_loss(hs, Ws, ht, Wt, labels, chunk_size=5, **kw) if not masked else None
    zs = (hs @ Ws.T).detach().requires_grad_()
    ours_logits = distillation_loss(zs, zt, labels, chunk_size=5, **kw)
    zs_r = zs.detach().clone().requires_grad_()
    ref = reference(zs_r, zt, labels, "forward_kl", T, alpha)
    torch.testing.assert_close(ours_logits, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours_logits, zs)[0], torch.autograd.grad(ref, zs_r)[0],
                               rtol=1e-9, atol=1e-12)
    if ours is not None:
        ref_f = reference(hs @ Ws.T, zt, labels, "forward_kl", T, alpha)
        for a, b in zip(torch.autograd.grad(ours, (hs, Ws)), torch.autograd.grad(ref_f, (hs, Ws))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_forward_kl_row_blocks_make_one_temporary_per_chunk(monkeypatch):
    """The fast forward-KL path makes one block-sized [R, V] tensor per chunk, not one or two per row block (fresh
    MiB-sized blocks are fresh pages from the kernel on CPU: page faults cost more than the softmax)."""
    from test_loss_accumulation import FreshTensors

    from lmdistill.losses import engine

    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 2 * 13)
    zs, zt = torch.randn(10, 13), torch.randn(10, 13)
    with FreshTensors((2, 13)) as fresh:
        engine.loss_chunk_(zs, zt, torch.zeros(10, dtype=torch.long), engine.KDConfig(), 0.1)
    assert fresh.count == 1  # for 5 row blocks (before: three per block, p, q and p * (zt - zs))
