"""Divergences between the teacher's distribution p and the student's q, with closed-form gradients.

Every divergence here takes log-probabilities over the same categories (the vocabulary, or the top-k
tokens plus a "rest" bucket) for a block of rows and returns

    value [R]       D(p, q) per row
    a     [R, V]    dD/dlog q, the gradient with respect to the student's log-probabilities

The engine turns `a` into the gradient with respect to the student's logits through the softmax:
for log q = log_softmax(z / T), dD/dz = (a - q * sum(a)) / T. Computing gradients in closed form (instead
of autograd) lets the engine overwrite a chunk of logits with its gradient in place, which is what keeps
the fused loss within one chunk of memory.

Teacher log-probabilities may be -inf (tokens outside the teacher's top-k); the formulas use the
convention 0 * log 0 = 0. Student log-probabilities are finite (the student is always a full softmax).

References:
- forward KL: Hinton et al., 2015, "Distilling the Knowledge in a Neural Network".
- reverse KL: Gu et al., 2024, "MiniLLM: Knowledge Distillation of Large Language Models".
- skew forward / reverse KL: Ko et al., 2024, "DistiLLM: Towards Streamlined Distillation for LLMs".
- generalized JSD: Agarwal et al., 2024, "On-Policy Distillation of Language Models (GKD)".
- TVD: Wen et al., 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lmdistill.errors import LmdistillError

DivergenceFn = Callable[..., "tuple[Tensor, Tensor]"]


def _plogp_ratio(w: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """w * (log_a - log_b) elementwise, with 0 where w == 0 and log_a == -inf (the convention 0 log 0 = 0).

    The only NaN the product can hold is 0 * (-inf), so one in-place pass maps NaN to 0 and keeps +-inf.
    """
    return (w * (log_a - log_b)).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _log_mix(log_x: Tensor, wx: float, log_y: Tensor, wy: float) -> Tensor:
    """log(wx * x + wy * y) from log x and log y, exact for weights in [0, 1]."""
    lx = log_x + math.log(wx) if wx > 0 else torch.full_like(log_x, -math.inf)
    ly = log_y + math.log(wy) if wy > 0 else torch.full_like(log_y, -math.inf)
    return torch.logaddexp(lx, ly)


def forward_kl(logp: Tensor, logq: Tensor, **_) -> tuple[Tensor, Tensor]:
    """KL(p || q) = sum p (log p - log q): mode-covering, the classic KD objective (Hinton 2015)."""
    p = logp.exp()
    return _plogp_ratio(p, logp, logq).sum(-1), -p


def reverse_kl(logp: Tensor, logq: Tensor, **_) -> tuple[Tensor, Tensor]:
    """KL(q || p) = sum q (log q - log p): mode-seeking, used by MiniLLM for generative students."""
    q = logq.exp()
    term = _plogp_ratio(q, logq, logp)
    return term.sum(-1), term + q


def skew_forward_kl(logp: Tensor, logq: Tensor, skew_lambda: float = 0.1, **_) -> tuple[Tensor, Tensor]:
    """KL(p || m), m = lambda p + (1 - lambda) q (DistiLLM): forward KL with a bounded gradient."""
    logm = _log_mix(logp, skew_lambda, logq, 1.0 - skew_lambda)
    p = logp.exp()
    a = -(1.0 - skew_lambda) * p * (logq - logm).exp()
    return _plogp_ratio(p, logp, logm).sum(-1), a


def skew_reverse_kl(logp: Tensor, logq: Tensor, skew_lambda: float = 0.1, **_) -> tuple[Tensor, Tensor]:
    """KL(q || m), m = (1 - lambda) p + lambda q (DistiLLM): reverse KL kept finite where p = 0."""
    logm = _log_mix(logp, 1.0 - skew_lambda, logq, skew_lambda)
    q = logq.exp()
    term = _plogp_ratio(q, logq, logm)
    return term.sum(-1), term + q - skew_lambda * q * (logq - logm).exp()


def jsd(logp: Tensor, logq: Tensor, jsd_beta: float = 0.5, **_) -> tuple[Tensor, Tensor]:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (generalized JSD, GKD)."""
    logm = _log_mix(logp, jsd_beta, logq, 1.0 - jsd_beta)
    p, q = logp.exp(), logq.exp()
    q_term = _plogp_ratio(q, logq, logm)
    value = jsd_beta * _plogp_ratio(p, logp, logm).sum(-1) + (1.0 - jsd_beta) * q_term.sum(-1)
    return value, (1.0 - jsd_beta) * q_term


def tvd(logp: Tensor, logq: Tensor, **_) -> tuple[Tensor, Tensor]:
    """Total variation 0.5 sum |p - q|: bounded and symmetric (Wen et al. 2023)."""
    p, q = logp.exp(), logq.exp()
    diff = q - p
    return 0.5 * diff.abs().sum(-1), 0.5 * q * torch.sign(diff)


DIVERGENCES: dict[str, DivergenceFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
}

ALIASES = {"fkl": "forward_kl", "kl": "forward_kl", "rkl": "reverse_kl", "skew_fkl": "skew_forward_kl",
           "sfkl": "skew_forward_kl", "skew_rkl": "skew_reverse_kl", "srkl": "skew_reverse_kl",
           "generalized_jsd": "jsd", "tv": "tvd"}

# Divergences that weigh log p by the student's mass and so are infinite where a truncated teacher has
# p = 0: with top-k they compare k tokens plus one "rest" bucket instead of the full vocabulary.
NEEDS_TAIL_BUCKET = frozenset({"reverse_kl"})


def canonical_divergence(name: str) -> str:
    """The canonical name of a divergence or alias; an unknown name lists the valid ones."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in DIVERGENCES:
        valid = ", ".join(list(DIVERGENCES) + sorted(ALIASES))
        raise LmdistillError(f"divergence: unknown name '{name}'. Valid names: {valid}.")
    return key
