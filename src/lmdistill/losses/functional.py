"""Public loss functions: `distillation_loss` on logits and `fused_distillation_loss` on hidden states.

    loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher || student)

averaged over trained positions (`reduction="mean"`) or summed (`"sum"`, for a training loop that divides
once by the global number of trained tokens). Labels are aligned with the logits (no shift inside);
positions equal to `ignore_index` contribute nothing. The teacher is treated as a constant.

`fused_distillation_loss(hs, Ws, ht, Wt, labels)` equals `distillation_loss(hs @ Ws.T, ht @ Wt.T, labels)`
in value and gradients (to hs, Ws and the optional student bias) but walks the trained positions in token
chunks, computing each chunk's logits in fp32 and its gradient in the forward pass, so at most one chunk
of `[tokens, vocab]` logits per model exists at a time and nothing is recomputed in backward.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmdistill.errors import LmdistillError
from lmdistill.losses.divergences import NEEDS_TAIL_BUCKET
from lmdistill.losses.engine import KDConfig, check_labels, compute_dtype, loss_chunk_
from lmdistill.losses.projection import (NO_HEAD, _add_weight_grad_, _head_backward_, _project_back, apply_head_,
                                         matmul_dtype, project_logits)
from lmdistill.losses.scores import ProjectedScores, TeacherScores

_D = KDConfig()  # one place for the loss options' defaults: the public functions' keywords take them from here

# Default memory for the two fp32 [chunk, vocab] logit buffers of the fused loss when chunk_size=None:
# up to 258 tokens at Qwen's 151,936-token vocabulary, where the matmuls are near full speed on CPU.
DEFAULT_CHUNK_BUDGET_BYTES = 300 * 2**20
MAX_CHUNK_TOKENS = 512


@dataclass
class LossParts:
    """A loss with its named terms: `loss` (differentiable), `terms` {name: sum over the trained positions}
    (unscaled by alpha and T^2, for logging: "ce", and "kd" when a teacher is involved) and the number of
    trained positions. A training loop divides each term once by its global token count; new terms (a
    hidden-state loss, a per-teacher KL) are new names, shown by the metrics and the report without edits."""

    loss: Tensor | None = None
    terms: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0

    def record(self, n: int, **terms: Tensor) -> None:
        self.terms, self.n_tokens = {k: v.item() for k, v in terms.items()}, n

    @property
    def kd_sum(self) -> float:
        return self.terms.get("kd", 0.0)

    @property
    def ce_sum(self) -> float:
        return self.terms.get("ce", 0.0)


def _trained_rows(labels: Tensor, ignore_index: int) -> Tensor:
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


def _weight(cfg: KDConfig, n: int) -> float:
    return 1.0 / n if (cfg.reduction == "mean" and n > 0) else 1.0


def _combine(kd: Tensor, ce: Tensor, cfg: KDConfig, weight: float, ce_weighted: bool = False) -> Tensor:
    """The loss from its sums; `ce_weighted`: the CE sum already carries per-row coefficients (instead of alpha)."""
    return ((1.0 if ce_weighted else cfg.alpha) * ce + (1.0 - cfg.alpha) * cfg.temperature**2 * kd) * weight


def _check_vocab(vs: int, vt: int, vocab_size: int | None, what: str) -> int:
    if vocab_size is None:
        if vs != vt:
            raise LmdistillError(
                f"{what}: student vocabulary {vs} != teacher vocabulary {vt}. If both models share a tokenizer "
                "and only the embedding padding differs, pass vocab_size=len(tokenizer) to compare the real "
                "tokens; different tokenizers cannot be distilled token by token."
            )
        return vs
    if vocab_size < 1 or vocab_size > min(vs, vt):
        raise LmdistillError(f"vocab_size: expected 1..{min(vs, vt)} (both models' sizes), found {vocab_size}.")
    return vocab_size


class _LogitsKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, labels: Tensor, cfg: KDConfig, chunk: int, parts: LossParts):
        V = zs.shape[-1]
        zs2, zt2, lab = zs.reshape(-1, V), zt.reshape(-1, V), labels.reshape(-1)
        rows = _trained_rows(labels, cfg.ignore_index)
        want_ce = check_labels(lab[rows], V, cfg)
        dt, weight = compute_dtype(zs.dtype), _weight(cfg, len(rows))
        grad = torch.empty(len(rows) if ctx.needs_input_grad[0] else 0, V, dtype=zs.dtype, device=zs.device)
        kd, ce = zs.new_zeros((), dtype=dt), zs.new_zeros((), dtype=dt)
        for start in range(0, len(rows), chunk):
            r = rows[start : start + chunk]
            buf = zs2.index_select(0, r).to(dt)
            kd_c, ce_c = loss_chunk_(buf, zt2.index_select(0, r).to(dt), lab[r], cfg, weight, want_ce)
            if len(grad):
                grad[start : start + chunk] = buf
            kd, ce = kd + kd_c, ce + ce_c
        ctx.save_for_backward(grad, rows)
        ctx.shape = zs.shape
        parts.record(len(rows), kd=kd, ce=ce)
        return _combine(kd, ce, cfg, weight)

    @staticmethod
    def backward(ctx, g: Tensor):
        grad, rows = ctx.saved_tensors
        full = grad.new_zeros(ctx.shape)
        full.view(-1, ctx.shape[-1]).index_copy_(0, rows, grad * g.to(grad.dtype))
        return full, None, None, None, None, None


# On CUDA (chunk_size=None) the logit buffers may take this share of the device's free memory, within
# [min(DEFAULT_CHUNK_BUDGET_BYTES, free / 4), MAX_CHUNK_BUDGET_BYTES], and chunks up to MAX_CHUNK_TOKENS_CUDA tokens:
# a GPU's GEMMs want more rows than a CPU's, and it has the memory to spare.
CUDA_BUDGET_SHARE = 1 / 16
MAX_CHUNK_BUDGET_BYTES = 4 * 2**30
MAX_CHUNK_TOKENS_CUDA = 4096


def chunk_budget(device=None, free_bytes: int | None = None) -> tuple[int, int]:
    """(bytes for the fused loss's logit buffers, most tokens per chunk) when chunk_size=None. CPU (or no device):
    DEFAULT_CHUNK_BUDGET_BYTES and MAX_CHUNK_TOKENS. CUDA: CUDA_BUDGET_SHARE of the device's free memory
    (`free_bytes`, else torch.cuda.mem_get_info), at least min(DEFAULT_CHUNK_BUDGET_BYTES, free / 4), at most
    MAX_CHUNK_BUDGET_BYTES, and MAX_CHUNK_TOKENS_CUDA tokens."""
    if device is None or torch.device(device).type != "cuda":
        return DEFAULT_CHUNK_BUDGET_BYTES, MAX_CHUNK_TOKENS
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    floor = min(DEFAULT_CHUNK_BUDGET_BYTES, free_bytes // 4)
    return min(MAX_CHUNK_BUDGET_BYTES, max(int(free_bytes * CUDA_BUDGET_SHARE), floor)), MAX_CHUNK_TOKENS_CUDA


def auto_chunk_size(vocab: int, n_rows: int, dtype: torch.dtype = torch.float32, buffers: int = 2, device=None,
                    free_bytes: int | None = None) -> int:
    """Tokens per chunk so the `buffers` [chunk, vocab] fp32 buffers (student and teacher logits; a third for a
    softcapped head) fit the budget of `chunk_budget(device)` (on CPU DEFAULT_CHUNK_BUDGET_BYTES), and at most its
    token cap (beyond that, small vocabularies gain no matmul speed, only memory); the rows are then split into equal
    chunks (1,024 rows at budget 258 -> 4 x 256, not 3 x 258 + 250)."""
    budget, most = chunk_budget(device, free_bytes)
    per_row = buffers * vocab * torch.empty((), dtype=compute_dtype(dtype)).element_size()
    n = max(n_rows, 1)
    largest = max(1, min(n, most, budget // per_row))
    return -(-n // -(-n // largest))





def _fused_chunks(hs2, Ws, bs, teacher, lab, rows, cfg, chunk, need, want_ce, row_weights=(None, None),
                  head=NO_HEAD, dh_out=None, dW_into=None, dW_alpha=1.0, grad_scale=1.0, mm_dtype=None) -> tuple:
    """Walk trained rows in token chunks: loss sums and gradients (dh, dW, db) in the compute dtype.
    `teacher(start, r, out)` writes the teacher logits of trained rows [start, start + len(r)) (positions r)
    into out [len(r), V]; None = CE only. `row_weights`: optional per-row (kd, ce) weights [n] (`loss_chunk_`).
    `head`: the student's (logit scale, softcap). `dh_out` [N, H]: when given, each chunk's hidden-state gradient
    goes straight into its rows (no [n, H] buffer). `dW_into` [V, H]: an existing buffer (the weight's .grad) that
    the weight gradient times `dW_alpha` is added into, chunk by chunk, instead of a new [V, H] buffer.
    `grad_scale` multiplies every gradient (a caller's loss scale, folded into the logit gradients: no extra pass).
    `mm_dtype` (`matmul_dtype`): the student's matmul operand dtype on CUDA (None: fp32)."""
    dt, n, dev = compute_dtype(hs2.dtype), len(rows), hs2.device
    weight = _weight(cfg, n)
    # dh rows are each written once and dW is set by the first chunk: no zero-filling pass over them.
    dh = None
    if need[0]:
        dh = dh_out if dh_out is not None else torch.empty(n, hs2.shape[1], dtype=dt, device=dev)
    dW = dW_into
    if dW is None and need[1]:
        dW = (torch.empty if n else torch.zeros)(Ws.shape, dtype=dt, device=dev)
    db = torch.zeros(bs.shape, dtype=dt, device=dev) if need[2] else None
    buffer = lambda: torch.empty(min(chunk, n), Ws.shape[0], dtype=dt, device=dev)  # noqa: E731
    zs_buf = buffer()
    zt_buf = None if teacher is None else buffer()
    kept_buf = buffer() if head[1] else None
    kd, ce = zs_buf.new_zeros(()), zs_buf.new_zeros(())
    for start in range(0, n, chunk):
        r = rows[start : start + chunk]
        h = hs2.index_select(0, r).to(mm_dtype or dt)  # the GEMMs' operand dtype: fp32, or bf16/fp16 on CUDA
        kept = None if kept_buf is None else kept_buf[: len(r)]
        zs = apply_head_(project_logits(h, Ws, bs, zs_buf[: len(r)], mm_dtype), head, kept)
        zt = None if teacher is None else teacher(start, r, zt_buf[: len(r)])
        kd_w, ce_w = (None if w is None else w[start : start + chunk].to(dt) for w in row_weights)
        kd_c, ce_c = loss_chunk_(zs, zt, lab[r], cfg, weight * grad_scale, want_ce, kd_w, ce_w)  # zs: d loss / d z
        zs = _head_backward_(zs, head, kept)
        kd, ce = kd + kd_c, ce + ce_c
        g_mm = None if mm_dtype is None else zs.to(mm_dtype)
        if dh is not None and dh_out is not None:
            dh.index_copy_(0, r, _project_back(zs, Ws, g_mm).to(dh.dtype))
        elif dh is not None:
            dh[start : start + chunk] = _project_back(zs, Ws, g_mm)
        if dW is not None:
            _add_weight_grad_(dW, zs, h, dW_into is None and start == 0, dW_alpha, g_mm)
        if db is not None:
            db += zs.sum(0)
    return kd, ce, weight, dh, dW, db


_PENDING = "_lmdistill_pending_backward"  # set on a .grad a fused loss's forward has added into, until its backward


def _grad_buffer(W: Tensor, V: int, dt: torch.dtype) -> Tensor | None:
    """The weight's existing .grad when the loss can add its gradient straight into it: a dense leaf gradient of the
    compute dtype (rows [:V] of it). None otherwise (first micro-batch, low-precision or sharded weights)."""
    g = W.grad
    if g is None or not W.is_leaf or g.dtype != dt or g.layout != torch.strided or g.shape != W.shape:
        return None
    if type(g) is not torch.Tensor or not g.is_contiguous():  # a DTensor or other subclass: leave it to autograd
        return None
    if getattr(g, _PENDING, False):  # another fused loss of the same graph already adds into it: take the usual path
        return None
    return g[:V]


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, Ws, bs, labels, cfg: KDConfig, chunk: int | None, V: int, parts: LossParts,
                scores: TeacherScores | None, row_weights: tuple = (None, None), head: tuple = NO_HEAD,
                loss_scale: float | None = None):
        hs2, lab = hs.reshape(-1, hs.shape[-1]), labels.reshape(-1)
        rows = _trained_rows(labels, cfg.ignore_index)
        want_ce = check_labels(lab[rows], V, cfg, required=row_weights[1] is not None)
        for name, w in zip(("kd_weights", "ce_weights"), row_weights):
            if w is not None and tuple(w.shape) != (len(rows),):
                raise LmdistillError(f"{name}: expected one weight per trained position ({len(rows)}), found shape "
                                     f"{tuple(w.shape)}.")
        chunk = chunk or auto_chunk_size(V, len(rows), hs.dtype, buffers=3 if head[1] else 2, device=hs.device)
        cut = lambda x: None if x is None else x[:V]  # noqa: E731  (padded vocabulary rows)
        teacher = None if scores is None else scores.block
        if scores is not None and scores.n_rows is not None and scores.n_rows != len(rows):
            raise LmdistillError(f"fused_teacher_distillation_loss: the teacher has {scores.n_rows} rows but the "
                                 f"labels mark {len(rows)} trained positions; expected one row per position.")
        need = ctx.needs_input_grad[:3]
        dt, scale = compute_dtype(hs.dtype), 1.0 if loss_scale is None else float(loss_scale)
        # A later micro-batch of gradient accumulation (or tied embeddings): the weight's gradient is added into its
        # existing .grad chunk by chunk, already times loss_scale (backward's incoming gradient is expected to be 1).
        into = _grad_buffer(Ws, V, dt) if (loss_scale is not None and need[1]) else None
        full_dh = None
        if need[0] and hs.dtype == dt:  # fp32 hidden states: chunk gradients go straight into their rows
            full_dh = hs.new_zeros(hs2.shape)
        mm = matmul_dtype(hs.device, Ws)  # CUDA: tensor-core GEMMs under autocast or for bf16/fp16 weights
        with torch.autocast(hs.device.type, enabled=False):  # chunk arithmetic is fp32 even under AMP
            kd, ce, weight, dh, dW, db = _fused_chunks(hs2, cut(Ws), cut(bs), teacher, lab, rows, cfg, chunk, need,
                                                       want_ce, row_weights, head, full_dh, into, 1.0, scale, mm)
        full_dW = full_db = None
        if dh is not None and full_dh is None:
            full_dh = hs.new_zeros(hs2.shape).index_copy_(0, rows, dh.to(hs.dtype))
        if full_dh is not None:
            full_dh = full_dh.view(hs.shape)
        if dW is not None and into is None:
            full_dW = dW.to(Ws.dtype) if V == Ws.shape[0] else Ws.new_zeros(Ws.shape).index_copy_(
                0, torch.arange(V, device=Ws.device), dW.to(Ws.dtype))
        if db is not None:
            full_db = bs.new_zeros(bs.shape)
            full_db[:V] = db
        grads = (full_dh, full_dW, full_db)
        ctx.present = [g is not None for g in grads]
        ctx.loss_scale, ctx.into = scale, into is not None
        if ctx.into:  # what backward needs to recompute the weight gradient if its incoming gradient is not 1
            ctx.weight, ctx.grad_buffer, ctx.consumed = Ws, Ws.grad, False
            setattr(Ws.grad, _PENDING, True)
            ctx.recompute = (cut(bs), teacher, lab, rows, cfg, chunk, want_ce, row_weights, head, V, mm)
            ctx.save_for_backward(*(g for g in grads if g is not None), hs2, cut(Ws))
        else:
            ctx.save_for_backward(*(g for g in grads if g is not None))
        parts.record(len(rows), ce=ce, **({} if scores is None else {"kd": kd}))
        return _combine(kd, ce, cfg, weight, ce_weighted=row_weights[1] is not None) * scale

    @staticmethod
    def backward(ctx, g: Tensor):
        saved, scale = iter(ctx.saved_tensors), g.item()  # the saved gradients already include loss_scale
        grads = [next(saved) if present else None for present in ctx.present]
        # A detached handle (same storage) lets autograd adopt the gradient as .grad instead of copying it,
        # which for the lm_head weight saves a [V, H] fp32 copy; the saved tensors are freed after backward.
        grads = [None if x is None else (x.detach() if scale == 1.0 else x * scale) for x in grads]
        if ctx.into:
            grads[1] = _weight_grad_in_place(ctx, scale, *saved)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None


def _weight_grad_in_place(ctx, incoming: float, hs2: Tensor, Ws_v: Tensor) -> Tensor:
    """The lm_head weight's gradient when the forward already added loss_scale x its own gradient into .grad:
    that .grad itself (autograd adopts it back, so no second [V, H] buffer), corrected by recomputing the weight
    gradient when backward's incoming gradient is not 1 (or on a second backward through the same graph)."""
    W, s = ctx.weight, ctx.loss_scale
    bs, teacher, lab, rows, cfg, chunk, want_ce, row_weights, head, V, mm = ctx.recompute

    def add_recomputed(buf: Tensor, alpha: float) -> None:
        with torch.autocast(hs2.device.type, enabled=False):
            _fused_chunks(hs2, Ws_v, bs, teacher, lab, rows, cfg, chunk, (False, True, False), want_ce, row_weights,
                          head, None, buf[:V], alpha, s, mm)

    if ctx.consumed:  # retain_graph: a second backward gets a fresh gradient
        buf = torch.zeros_like(W)
        add_recomputed(buf, incoming)
        return buf
    ctx.consumed = True
    buf, ctx.grad_buffer = ctx.grad_buffer, None
    setattr(buf, _PENDING, False)
    if W.grad is not buf:
        raise LmdistillError("fused loss with loss_scale: the lm_head weight's .grad was replaced between the loss's "
                             "forward and its backward; the forward had already added its gradient into the old one. "
                             "Zero or replace gradients before the forward, not between forward and backward.")
    if incoming != 1.0:
        warnings.warn(f"fused loss: backward's incoming gradient is {incoming:g}, not 1, but loss_scale={s:g} was "
                      "given, so the lm_head weight gradient was recomputed (exact, about twice the loss's cost). "
                      "Pass the whole scale as loss_scale and call backward on the loss as it is.", stacklevel=3)
        add_recomputed(buf, incoming - 1.0)
    W.grad = None  # handed back through autograd, which adopts it as .grad (and runs DDP/FSDP hooks as usual)
    return buf.detach()


def _head(who: str, logit_scale: float, softcap: float | None) -> tuple[float, float | None]:
    """A head's (logit scale, softcap), checked: logits = softcap * tanh(logit_scale * (h @ W.T + b) / softcap)."""
    prefix = f"{who}_" if who else ""
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale != 0):
        raise LmdistillError(f"{prefix}logit_scale: expected a finite nonzero number, found {logit_scale!r}.")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise LmdistillError(f"{prefix}softcap: expected None or a finite number > 0, found {softcap!r}.")
    return float(logit_scale), None if not softcap else float(softcap)


def _loss_scale(loss_scale: float | None) -> float | None:
    if loss_scale is not None and not (isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale)):
        raise LmdistillError(f"loss_scale: expected None or a finite number, found {loss_scale!r}.")
    return None if loss_scale is None else float(loss_scale)


def _check_shapes(what: str, a: Tensor, b: Tensor, labels: Tensor, dims: tuple[str, str]) -> None:
    if a.shape[:-1] != labels.shape or b.shape[:-1] != labels.shape:
        raise LmdistillError(
            f"{what}: expected {dims[0]} {tuple(a.shape)} and {dims[1]} {tuple(b.shape)} to have the labels' "
            f"shape {tuple(labels.shape)} plus one last dimension; they do not match."
        )


def distillation_loss_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                            vocab_size: int | None = None, chunk_size: int | None = None, **options) -> LossParts:
    """`distillation_loss` with its KD/CE sums and token count (for logging)."""
    cfg = KDConfig(**options)
    _check_shapes("distillation_loss", student_logits, teacher_logits, labels, ("student_logits", "teacher_logits"))
    V = _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size, "distillation_loss")
    zs, zt = student_logits[..., :V], teacher_logits[..., :V].detach()
    chunk = chunk_size or auto_chunk_size(V, labels.numel(), zs.dtype, device=zs.device)
    parts = LossParts()
    parts.loss = _LogitsKD.apply(zs, zt, labels, cfg, chunk, parts)
    return parts


def fused_distillation_loss_parts(student_hidden: Tensor, student_lm_head_weight: Tensor, teacher_hidden: Tensor,
                                  teacher_lm_head_weight: Tensor, labels: Tensor, *, chunk_size: int | None = None,
                                  vocab_size: int | None = None, student_lm_head_bias: Tensor | None = None,
                                  teacher_lm_head_bias: Tensor | None = None, student_logit_scale: float = 1.0,
                                  student_softcap: float | None = None, teacher_logit_scale: float = 1.0,
                                  teacher_softcap: float | None = None, loss_scale: float | None = None,
                                  **options) -> LossParts:
    """`fused_distillation_loss` with its KD/CE sums and token count (for logging)."""
    cfg = KDConfig(**options)
    Ws, Wt = student_lm_head_weight, teacher_lm_head_weight.detach()
    _check_shapes("fused_distillation_loss", student_hidden, teacher_hidden, labels, ("student_hidden", "teacher_hidden"))
    for name, h, W in (("student", student_hidden, Ws), ("teacher", teacher_hidden, Wt)):
        if W.dim() != 2 or W.shape[1] != h.shape[-1]:
            raise LmdistillError(
                f"fused_distillation_loss: expected {name}_lm_head_weight of shape [vocab, {h.shape[-1]}] "
                f"(the {name} hidden size), found {tuple(W.shape)}."
            )
    V = _check_vocab(Ws.shape[0], Wt.shape[0], vocab_size, "fused_distillation_loss")
    if chunk_size is not None and chunk_size < 1:
        raise LmdistillError(f"chunk_size: expected None or an integer >= 1, found {chunk_size}.")
    scores = ProjectedScores(teacher_hidden, Wt, teacher_lm_head_bias, V,
                             _head("teacher", teacher_logit_scale, teacher_softcap))
    parts = LossParts()
    parts.loss = _FusedKD.apply(student_hidden, Ws, student_lm_head_bias, labels, cfg, chunk_size, V, parts, scores,
                                (None, None), _head("student", student_logit_scale, student_softcap),
                                _loss_scale(loss_scale))
    return parts


def fused_teacher_distillation_loss_parts(student_hidden: Tensor, student_lm_head_weight: Tensor,
                                         teacher: TeacherScores, labels: Tensor, *, chunk_size: int | None = None,
                                         student_lm_head_bias: Tensor | None = None, kd_weights: Tensor | None = None,
                                         ce_weights: Tensor | None = None, student_logit_scale: float = 1.0,
                                         student_softcap: float | None = None, loss_scale: float | None = None,
                                         **options) -> LossParts:
    """The fused loss against any teacher's scores (`lmdistill.losses.scores.TeacherScores`: an online model's
    hidden states, top-k rows of a cache, an ensemble), one row per trained position of `labels`.

    Optional per-position weights [n_trained] (constants, in the order of `labels != ignore_index`):
    `kd_weights` multiply each position's divergence, `ce_weights` replace alpha as each position's CE coefficient
    (they may be negative: a policy-gradient advantage), so the summed loss is
    sum_i [(1 - alpha) T^2 kd_weights[i] D_i + ce_weights[i] CE_i]; the terms then hold the weighted sums
    (MiniLLM, `lmdistill.losses.minillm`).

    A teacher exact only over a top-k (`teacher.stored_k`, a cache) sets `top_k` to k by default and refuses a larger
    one: the loss then equals the online teacher's with the same `top_k` (renormalized over the k tokens at any
    temperature; divergences with a tail bucket take the teacher's remaining mass from its log-normalizer,
    known at T=1 only)."""
    k = teacher.stored_k if teacher.stored_k is not None and teacher.stored_k < teacher.vocab_size else None
    if k is not None:
        options.setdefault("top_k", k)
    cfg = KDConfig(**options)
    if k is not None and (cfg.top_k is None or cfg.top_k > k):
        raise LmdistillError(f"top_k: the teacher rows hold the top {k} tokens; expected top_k <= {k}, found "
                             f"{cfg.top_k}.")
    if k is not None and cfg.divergence in NEEDS_TAIL_BUCKET and cfg.temperature != 1.0:
        raise LmdistillError(f"{cfg.divergence} with a top-k teacher cache needs temperature 1 (found "
                             f"{cfg.temperature}): the cache knows the teacher's remaining mass only at T=1.")
    Ws = student_lm_head_weight
    if Ws.dim() != 2 or Ws.shape[1] != student_hidden.shape[-1]:
        raise LmdistillError(f"fused_teacher_distillation_loss: expected student_lm_head_weight of shape "
                             f"[vocab, {student_hidden.shape[-1]}], found {tuple(Ws.shape)}.")
    if student_hidden.shape[:-1] != labels.shape:
        raise LmdistillError(f"fused_teacher_distillation_loss: expected labels of shape "
                             f"{tuple(student_hidden.shape[:-1])} (student_hidden without its last dimension), found "
                             f"{tuple(labels.shape)}.")
    V = teacher.vocab_size
    if Ws.shape[0] < V:
        raise LmdistillError(f"fused_teacher_distillation_loss: the teacher's vocabulary has {V} tokens but the "
                             f"student's lm_head only {Ws.shape[0]} rows.")
    if chunk_size is not None and chunk_size < 1:
        raise LmdistillError(f"chunk_size: expected None or an integer >= 1, found {chunk_size}.")
    parts = LossParts()
    weights = tuple(None if w is None else w.detach().to(student_hidden.device) for w in (kd_weights, ce_weights))
    parts.loss = _FusedKD.apply(student_hidden, Ws, student_lm_head_bias, labels, cfg, chunk_size, V, parts, teacher,
                                weights, _head("student", student_logit_scale, student_softcap),
                                _loss_scale(loss_scale))
    return parts


def fused_topk_distillation_loss_parts(student_hidden: Tensor, student_lm_head_weight: Tensor, teacher, labels: Tensor,
                                       **kwargs) -> LossParts:
    """The fused loss against top-k teacher rows (`lmdistill.teachers.TopKTeacher`: ids, T=1 logits and
    log-normalizer at each trained position, in the order of `labels != ignore_index`); see
    `fused_teacher_distillation_loss_parts`."""
    return fused_teacher_distillation_loss_parts(student_hidden, student_lm_head_weight,
                                                 teacher.to(student_hidden.device), labels, **kwargs)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                      divergence: str = _D.divergence, temperature: float = _D.temperature, alpha: float = _D.alpha,
                      skew_lambda: float = _D.skew_lambda, jsd_beta: float = _D.jsd_beta, top_k: int | None = None,
                      ignore_index: int = -100, reduction: str = "mean", **kwargs) -> Tensor:
    """KD loss on logits `[..., V]` with labels `[...]` (see the module docstring for the formula).

    Extra keywords: `vocab_size` (compare only the first vocab_size columns, for padded embeddings) and
    `chunk_size` (rows processed at once).
    """
    return distillation_loss_parts(student_logits, teacher_logits, labels, divergence=divergence,
                                   temperature=temperature, alpha=alpha, skew_lambda=skew_lambda, jsd_beta=jsd_beta,
                                   top_k=top_k, ignore_index=ignore_index, reduction=reduction, **kwargs).loss


def fused_distillation_loss(student_hidden: Tensor, student_lm_head_weight: Tensor, teacher_hidden: Tensor,
                            teacher_lm_head_weight: Tensor, labels: Tensor, divergence: str = _D.divergence,
                            temperature: float = _D.temperature, alpha: float = _D.alpha,
                            skew_lambda: float = _D.skew_lambda, jsd_beta: float = _D.jsd_beta,
                            top_k: int | None = None, ignore_index: int = -100, reduction: str = "mean",
                            chunk_size: int | None = None, **kwargs) -> Tensor:
    """KD loss from hidden states `[..., H]` and lm_head weights `[V, H]`, one logits chunk at a time.

    Equals `distillation_loss(hs @ Ws.T, ht @ Wt.T, labels, ...)` in value and gradients. Extra keywords:
    `vocab_size`, `student_lm_head_bias`, `teacher_lm_head_bias`. `chunk_size=None` picks the chunk from
    DEFAULT_CHUNK_BUDGET_BYTES.
    """
    return fused_distillation_loss_parts(student_hidden, student_lm_head_weight, teacher_hidden,
                                         teacher_lm_head_weight, labels, divergence=divergence,
                                         temperature=temperature, alpha=alpha, skew_lambda=skew_lambda,
                                         jsd_beta=jsd_beta, top_k=top_k, ignore_index=ignore_index,
                                         reduction=reduction, chunk_size=chunk_size, **kwargs).loss


def fused_cross_entropy_parts(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *, reduction: str = "mean",
                              ignore_index: int = -100, chunk_size: int | None = None,
                              lm_head_bias: Tensor | None = None, logit_scale: float = 1.0,
                              softcap: float | None = None, loss_scale: float | None = None) -> LossParts:
    """Cross-entropy from hidden states `[..., H]` and an lm_head `[V, H]`, one logits chunk at a time.

    The same engine as the fused KD loss with alpha = 1 and no teacher: plain CE training (`lmdistill train`)
    gets the same memory bound as distillation.
    """
    cfg = KDConfig(alpha=1.0, reduction=reduction, ignore_index=ignore_index)
    if hidden.shape[:-1] != labels.shape or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise LmdistillError(
            f"fused_cross_entropy: expected hidden [..., H] with labels [...] and lm_head_weight [V, H]; found hidden "
            f"{tuple(hidden.shape)}, labels {tuple(labels.shape)}, lm_head_weight {tuple(lm_head_weight.shape)}."
        )
    parts = LossParts()
    parts.loss = _FusedKD.apply(hidden, lm_head_weight, lm_head_bias, labels, cfg, chunk_size,
                                lm_head_weight.shape[0], parts, None, (None, None), _head("", logit_scale, softcap),
                                _loss_scale(loss_scale))
    return parts
