"""MiniLLM's per-token weights (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models").

MiniLLM minimizes the sequence-level reverse KL, KL(q_theta(y|x) || p(y|x)) = -E_{y~q}[sum_t r_t] with
r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x), whose policy gradient splits into (the paper's Eq. 4-5)

    single step:  sum_t grad KL(q(.|y_<t, x) || p(.|y_<t, x))          exact over the vocabulary
    long term:   -sum_t R_{t+1} grad log q(y_t | y_<t, x),   R_{t+1} = sum_{t' > t} r_t'

Both are one fused-loss call (`fused_teacher_distillation_loss_parts`) with per-position weights: the reverse KL
of position t weighted by w_t, and the CE (-log q(y_t)) weighted by w_t * R_{t+1} (a constant), since
d/dtheta [c * CE_t] = -c * grad log q(y_t). With the paper's devices:

- teacher-mixed sampling: y is drawn from p~ = alpha p + (1 - alpha) q, and each token's terms are weighted by
  the per-token importance weight w_t = q(y_t) / p~(y_t) (the paper's approximation of the sequence ratio),
  clipped to [1 - clip, 1 + clip];
- length normalization: R_{t+1} is replaced by its mean over the tokens after t (0 after the last one).

Without both (alpha = 0, no normalization) the expected gradient equals the exact gradient of the sequence-level
reverse KL (tests/test_minillm.py checks this by enumerating every sequence of a tiny vocabulary).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MiniLLMWeights(NamedTuple):
    kd: Tensor  # [n] weight of each completion token's single-step reverse KL (the importance weight)
    pg: Tensor  # [n] CE coefficient of each completion token: importance weight x normalized future reward
    stats: dict  # reward (length-normalized sequence reward), importance_weight (mean), clipped_share


def minillm_weights(logq: Tensor, logp: Tensor, logmix: Tensor, mask: Tensor, clip: float | None = 0.2,
                    length_normalized: bool = True) -> MiniLLMWeights:
    """Per-token weights of sampled completions, flattened in row-major order of `mask` (the order of the
    trained positions of the batch they come from).

    logq, logp, logmix: [B, L] log-probabilities of each sampled token under the student, the teacher and the
    distribution it was drawn from (all at temperature 1); mask [B, L]: True on completion tokens (a prefix of
    each row). `clip` None keeps the importance weights unclipped."""
    mask = mask.bool()
    f = mask.to(torch.float64)
    logq, logp, logmix = (x.to(torch.float64) * f for x in (logq, logp, logmix))
    r = logp - logq
    future = r.flip(1).cumsum(1).flip(1) - r  # R_{t+1}: the rewards after t
    if length_normalized:
        after = f.flip(1).cumsum(1).flip(1) - f  # tokens after t
        future = torch.where(after > 0, future / after.clamp(min=1), torch.zeros_like(future))
    raw = (logq - logmix).exp()
    w = raw if clip is None else raw.clamp(1.0 - clip, 1.0 + clip)
    lengths = f.sum(1).clamp(min=1)
    n = max(int(mask.sum()), 1)
    stats = {"reward": float(((r.sum(1)) / lengths).mean()) if len(r) else 0.0,
             "importance_weight": float(raw[mask].sum()) / n,
             "clipped_share": float((raw[mask] != w[mask]).sum()) / n}
    return MiniLLMWeights(w[mask], (w * future)[mask], stats)  # float64; the loss casts to its compute dtype
