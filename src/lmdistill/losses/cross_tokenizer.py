"""The losses of cross-tokenizer distillation (teacher and student with different tokenizers, `--cross_tokenizer`).
Where the two tokenizations can be compared and which tokens the two vocabularies share is alignment, in
`lmdistill.data.alignment`; the batches that carry both tokenizations are made by `lmdistill.data.cross_tokenizer`.

Losses, per aligned position, on next-token logits zs [C, Vs] (student) and zt [C, Vt] (teacher):
- `uld_loss` (Universal Logit Distillation, Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
  Universal Logit Distillation Loss for LLMs"): sum_i |sort(q)_i - sort(p)_i|, both probability vectors sorted in
  descending order and the shorter padded with zeros -- the Wasserstein-1 distance over ranks; needs no mapping.
- `gold_loss` (after TRL's GOLD): tokens that stand for the same bytes in both vocabularies (`lmdistill.data.alignment.shared_vocabulary`)
  are compared one to one -- forward KL between the two distributions restricted to the shared tokens, each
  renormalized there -- and the remaining (unshared) probabilities by ULD: matched_weight * KL +
  unmatched_weight * ULD(unshared). With one tokenizer on both sides every token is shared and the loss is the
  forward KL. Caveat, measured (README): the same token string is not the same event when one vocabulary has
  longer merges -- a teacher that would emit "tea." gives little probability to "te", which the student needs.
"""

from __future__ import annotations


import torch
from torch import Tensor


def _fp(x: Tensor) -> Tensor:
    """fp32 arithmetic (float64 stays float64, for references)."""
    return x if x.dtype == torch.float64 else x.float()


def _sorted_l1(q: Tensor, p: Tensor) -> Tensor:
    """Per row: sum |sort(q) - sort(p)| in descending order, the shorter vector padded with zeros."""
    qs, ps = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
    n = max(qs.shape[-1], ps.shape[-1])
    qs = torch.nn.functional.pad(qs, (0, n - qs.shape[-1]))
    ps = torch.nn.functional.pad(ps, (0, n - ps.shape[-1]))
    return (qs - ps).abs().sum(-1)


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
             top_k: int | None = None) -> Tensor:
    """ULD per row [C]: the L1 distance between the sorted next-token probabilities (the teacher a constant);
    with `top_k`, between the k largest probabilities of each side only."""
    q = torch.softmax(_fp(student_logits) / temperature, -1)
    p = torch.softmax(_fp(teacher_logits.detach()) / temperature, -1)
    if top_k is not None:
        q, p = q.topk(min(top_k, q.shape[-1]), -1).values, p.topk(min(top_k, p.shape[-1]), -1).values
    return _sorted_l1(q, p)


def gold_loss(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor, teacher_ids: Tensor,
              temperature: float = 1.0, matched_weight: float = 1.0, unmatched_weight: float = 1.0,
              top_k: int | None = None) -> Tensor:
    """GOLD-style per row [C]: forward KL over the shared tokens (both renormalized there) and ULD over the others.
    With `top_k`, the teacher keeps its k largest logits (renormalized over them, as the same-tokenizer loss does);
    a row whose top k holds no shared token has no KL term."""
    zt = _fp(teacher_logits.detach()) / temperature
    if top_k is not None and top_k < zt.shape[-1]:
        kth = zt.topk(top_k, -1).values[:, -1:]
        zt = zt.masked_fill(zt < kth, -torch.inf)
    logq = torch.log_softmax(_fp(student_logits) / temperature, -1)
    logp = torch.log_softmax(zt, -1)
    sid, tid = student_ids.to(logq.device), teacher_ids.to(logq.device)
    # both distributions restricted to the shared tokens and renormalized there (a token's probability is only
    # comparable with the same token's: the unshared mass is not one event on both sides)
    lq_m = logq[:, sid] - torch.logsumexp(logq[:, sid], -1, keepdim=True)
    lp_m = logp[:, tid] - torch.logsumexp(logp[:, tid], -1, keepdim=True)
    # outside a top_k p is 0, and NaN in a row whose top k holds no shared token: both contribute nothing (the
    # teacher is a constant, so zeroing it here keeps every gradient finite)
    p_m = torch.nan_to_num(lp_m.exp(), nan=0.0)
    kl = (p_m * (torch.where(p_m > 0, lp_m, torch.zeros_like(lp_m)) - lq_m)).sum(-1)
    s_free = torch.ones(logq.shape[-1], dtype=torch.bool, device=logq.device)
    t_free = torch.ones(logp.shape[-1], dtype=torch.bool, device=logp.device)
    s_free[sid], t_free[tid] = False, False
    if not bool(s_free.any()) and not bool(t_free.any()):
        return matched_weight * kl
    uld = _sorted_l1(logq.exp()[:, s_free], logp.exp()[:, t_free])
    return matched_weight * kl + unmatched_weight * uld


def cross_tokenizer_loss_parts(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                               targets: Tensor, student_rows: Tensor, teacher_hidden_rows: Tensor,
                               teacher_weight: Tensor, teacher_bias: Tensor | None, kind: str, student_vocab: int,
                               teacher_vocab: int, temperature: float = 1.0, alpha: float = 0.0,
                               top_k: int | None = None, shared: tuple[Tensor, Tensor] | None = None,
                               chunk_size: int = 256):
    """alpha * CE(all trained positions) + (1 - alpha) * sum over aligned rows of ULD or GOLD (summed, for a loop
    that divides by its trained-token count), as `LossParts` with terms "ce" and `kind`.

    student_hidden [B, T, H] with `targets` [B, T] (shifted labels); student_rows [n]: flat positions (into B*T) of
    the aligned predictions; teacher_hidden_rows [n, Ht]: the teacher's final hidden states at the matching
    positions. Logits are made one chunk of rows at a time and recomputed in backward (activation checkpointing),
    so no [n, vocab] logits of either model outlive a chunk."""
    from torch.utils.checkpoint import checkpoint

    from lmdistill.errors import LmdistillError
    from lmdistill.losses.functional import LossParts, fused_cross_entropy_parts

    if kind not in ("uld", "gold"):
        raise LmdistillError(f"--cross_tokenizer: expected uld or gold, found {kind!r}.")
    if kind == "gold" and shared is None:
        raise LmdistillError("gold needs the shared vocabulary (student ids, teacher ids).")
    if alpha > 0:
        ce = fused_cross_entropy_parts(student_hidden, student_weight, targets, reduction="sum",
                                       lm_head_bias=student_bias)
    else:  # logged, not trained
        with torch.no_grad():
            ce = fused_cross_entropy_parts(student_hidden.detach(), student_weight.detach(), targets, reduction="sum",
                                           lm_head_bias=None if student_bias is None else student_bias.detach())
    Ws, bs = student_weight[:student_vocab], None if student_bias is None else student_bias[:student_vocab]
    Wt = teacher_weight[:teacher_vocab].detach()
    bt = None if teacher_bias is None else teacher_bias[:teacher_vocab].detach()
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, student_rows)

    def chunk_loss(h: Tensor, w: Tensor, b: Tensor | None, ht: Tensor) -> Tensor:
        zs = torch.nn.functional.linear(_fp(h), _fp(w), None if b is None else _fp(b))
        with torch.no_grad():
            zt = torch.nn.functional.linear(_fp(ht), _fp(Wt), None if bt is None else _fp(bt))
        if kind == "uld":
            return uld_loss(zs, zt, temperature, top_k).sum()
        return gold_loss(zs, zt, shared[0], shared[1], temperature, top_k=top_k).sum()

    kd = student_hidden.new_zeros((), dtype=torch.float32 if student_hidden.dtype != torch.float64 else torch.float64)
    with torch.autocast(student_hidden.device.type, enabled=False):
        for start in range(0, len(student_rows), chunk_size):
            h, ht = hs[start : start + chunk_size], teacher_hidden_rows[start : start + chunk_size]
            kd = kd + (checkpoint(chunk_loss, h, Ws, bs, ht, use_reentrant=False) if torch.is_grad_enabled()
                       else chunk_loss(h, Ws, bs, ht))
    parts = LossParts()
    parts.loss = alpha * ce.loss + (1.0 - alpha) * kd if alpha > 0 else kd
    parts.terms, parts.n_tokens = {"ce": ce.terms["ce"], kind: float(kd.detach())}, ce.n_tokens
    return parts
