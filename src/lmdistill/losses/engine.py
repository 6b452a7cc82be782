"""The loss engine: KD + CE value and student-logit gradient for a block of trained positions.

One kernel serves every API. It takes a chunk of student logits `zs [C, V]` and teacher logits
`zt [C, V]` (rows = trained positions only), walks it in small row blocks, and overwrites `zs` with
d loss / d zs. Because the gradient is computed in the forward pass, the fused loss never keeps logits
for backward and never recomputes them: per token chunk it holds exactly two `[C, V]` buffers.

    loss = alpha * CE(zs, labels) + (1 - alpha) * T^2 * D(softmax(zt / T) || softmax(zs / T))

with D from `divergences.py`; CE is at T = 1 on the same positions. With `top_k`, the teacher keeps its k
largest logits renormalized over them; divergences in NEEDS_TAIL_BUCKET instead compare the k tokens
plus one "rest" category holding each side's remaining (unrenormalized) mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.errors import LmdistillError
from lmdistill.losses.divergences import DIVERGENCES, NEEDS_TAIL_BUCKET, canonical_divergence

# Row blocks hold ~this many elements per temporary: large enough for vectorized kernels, small enough
# that the ~8 temporaries of a block stay in the tens of MiB at Qwen's vocabulary of 151,936.
ROW_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class KDConfig:
    """Validated loss options (the keywords of the public loss functions)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    skew_lambda: float = 0.1
    jsd_beta: float = 0.5
    top_k: int | None = None
    ignore_index: int = -100
    reduction: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "divergence", canonical_divergence(self.divergence))
        checks = [
            (math.isfinite(self.temperature) and self.temperature > 0, "temperature", "> 0", self.temperature),
            (0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]", self.alpha),
            (0.0 <= self.skew_lambda <= 1.0, "skew_lambda", "in [0, 1]", self.skew_lambda),
            (0.0 < self.jsd_beta < 1.0, "jsd_beta", "in (0, 1) (the JSD vanishes at 0 and 1; use "
             "forward_kl or reverse_kl there)", self.jsd_beta),
            (self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1), "top_k",
             "None or an integer >= 1", self.top_k),
            (self.reduction in ("mean", "sum"), "reduction", "'mean' or 'sum'", self.reduction),
        ]
        for ok, name, expected, found in checks:
            if not ok:
                raise LmdistillError(f"{name}: expected {expected}, found {found!r}.")

    def params(self) -> dict:
        return {"skew_lambda": self.skew_lambda, "jsd_beta": self.jsd_beta}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the engine: float64 stays float64 (for references), anything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_rest(log_probs: Tensor, idx: Tensor) -> Tensor:
    """log of the probability mass outside the columns `idx` of each row: [R, V], [R, k] -> [R, 1]."""
    return log_probs.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True)


def _kd_block(zs: Tensor, zt: Tensor, cfg: KDConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Divergence per row, dD/dlog q [R, V] and log q [R, V] for raw logits zs, zt [R, V]."""
    fn, T = DIVERGENCES[cfg.divergence], cfg.temperature
    zs_t, zt_t = (zs, zt) if T == 1.0 else (zs / T, zt / T)
    logq = torch.log_softmax(zs_t, -1)
    k = cfg.top_k
    if k is None or k >= zs.shape[-1]:
        value, a = fn(torch.log_softmax(zt_t, -1), logq, **cfg.params())
        return value, a, logq
    vals, idx = zt_t.topk(k, dim=-1, sorted=False)  # same top-k set at any T > 0
    if cfg.divergence not in NEEDS_TAIL_BUCKET:
        logp = torch.full_like(logq, -math.inf).scatter_(-1, idx, torch.log_softmax(vals, -1))
        value, a = fn(logp, logq, **cfg.params())
        return value, a, logq
    logp_all = torch.log_softmax(zt_t, -1)
    logp_cat = torch.cat([logp_all.gather(-1, idx), _log_rest(logp_all, idx)], -1)
    logq_rest = _log_rest(logq, idx)
    value, a_cat = fn(logp_cat, torch.cat([logq.gather(-1, idx), logq_rest], -1), **cfg.params())
    # Each token outside the top-k gets the rest bucket's gradient in proportion to its share of q_rest.
    q_rest = logq_rest.exp()
    per_unit = torch.where(q_rest > 0, a_cat[:, -1:] / q_rest, q_rest.new_zeros(()))
    a = (logq.exp() * per_unit).scatter_(-1, idx, a_cat[:, :-1])
    return value, a, logq


def _softmax_lse(z: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(z) (into `out` when given) and logsumexp(z) [R, 1] with one exp pass: the largest probability sits
    at the largest logit, so lse = max z - log max softmax(z)."""
    m = z.amax(-1, keepdim=True)
    probs = torch.softmax(z, -1) if out is None else torch.ops.aten._softmax.out(z, -1, False, out=out)
    return probs, m - probs.amax(-1, keepdim=True).log()


def _forward_kl_block_(zs: Tensor, zt: Tensor, target: Tensor, cfg: KDConfig, weight: float,
                       want_ce: bool, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`_loss_block_` for forward KL over the full vocabulary when alpha = 0 or T = 1 (the common case):
    two exp passes instead of four, and one [R, V] temporary (p, in `scratch` when given: reused across blocks,
    so no fresh pages per block); q is written over zt once p (zt - zs) has been summed. Overwrites zs and zt.

    KL(p || q) = sum p (zt - zs) / T - (lse_t - lse_s) for the tempered logits; gradient T (q - p)."""
    T, alpha = cfg.temperature, cfg.alpha
    ce = zs.new_zeros(())
    if want_ce or alpha > 0:  # CE at T = 1 from the raw logits: lse(zs) - zs[label]
        z_label = zs.gather(-1, target[:, None]).squeeze(-1)
        if T != 1.0:
            ce = (torch.logsumexp(zs, -1) - z_label).sum()
    if T != 1.0:
        zs.div_(T), zt.div_(T)
    p, lse_t = _softmax_lse(zt, None if scratch is None else scratch[: len(zt)])
    pd = zt.sub_(zs).mul_(p)  # p (zt - zs) in place: no [R, V] temporary
    rows = pd.sum(-1)
    if not bool(torch.isfinite(rows).all()):  # -inf teacher logits: p = 0 there, and 0 * log 0 = 0 (not NaN)
        rows = pd.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)
    q, lse_s = _softmax_lse(zs, pd)  # zt is spent: q takes its place
    if T == 1.0 and (want_ce or alpha > 0):
        ce = (lse_s.squeeze(-1) - z_label).sum()
    kd = (rows - (lse_t - lse_s).squeeze(-1)).sum()
    c_kd = (1.0 - alpha) * T * weight  # d(T^2 KL)/dz = T (q - p)
    c_ce = alpha * weight  # at T = 1 the CE gradient is q - onehot with the same q
    torch.mul(q, c_kd + c_ce, out=zs).sub_(p, alpha=c_kd)
    if alpha > 0:
        zs.scatter_add_(-1, target[:, None], zs.new_full((len(target), 1), -c_ce))
    return kd, ce


def _loss_block_(zs: Tensor, zt: Tensor | None, target: Tensor, cfg: KDConfig, weight: float,
                 want_ce: bool, kd_w: Tensor | None = None, ce_w: Tensor | None = None,
                 scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """KD and CE sums of a row block; overwrites zs [R, V] with weight * d loss / d zs (and may overwrite zt).
    Row weights (`loss_chunk_`): kd_w [R] multiplies each row's divergence, ce_w [R] replaces alpha as each row's
    CE coefficient; the sums returned are then weighted too."""
    if (kd_w is None and ce_w is None and zt is not None and cfg.divergence == "forward_kl"
            and (cfg.top_k is None or cfg.top_k >= zs.shape[-1]) and (cfg.alpha == 0 or cfg.temperature == 1.0)):
        return _forward_kl_block_(zs, zt, target, cfg, weight, want_ce, scratch)
    ce = kd = zs.new_zeros(())
    logq = None
    if zt is None:  # CE only (no teacher)
        grad = torch.zeros_like(zs)
    else:
        value, a, logq = _kd_block(zs, zt, cfg)
        # d(T^2 D(z / T))/dz = T * (a - q * sum(a)); forward KL has a = -p with sum(p) = 1: T * (q - p)
        grad = logq.exp()
        grad = grad.add_(a) if cfg.divergence == "forward_kl" else a.sub_(grad.mul_(a.sum(-1, keepdim=True)))
        grad.mul_((1.0 - cfg.alpha) * cfg.temperature * weight)
        if kd_w is not None:
            value = value * kd_w
            grad.mul_(kd_w[:, None])
        kd = value.sum()
    ce_grad = cfg.alpha > 0 or ce_w is not None
    logq1 = logq if (cfg.temperature == 1.0 and logq is not None) else None
    if ce_grad and logq1 is None:
        logq1 = torch.log_softmax(zs, -1)
    if logq1 is not None and (ce_grad or want_ce):
        nll = -logq1.gather(-1, target[:, None]).squeeze(-1)
        ce = (nll if ce_w is None else nll * ce_w).sum()
    elif want_ce:  # CE for logging only (alpha = 0 at T != 1): lse(z) - z[label], one pass
        ce = (torch.logsumexp(zs, -1) - zs.gather(-1, target[:, None]).squeeze(-1)).sum()
    if ce_grad:
        g = logq1.exp().scatter_add_(-1, target[:, None], logq1.new_full((len(target), 1), -1.0))
        if ce_w is None:
            grad.add_(g, alpha=cfg.alpha * weight)
        else:
            grad.add_(g.mul_(ce_w[:, None] * weight))
    zs.copy_(grad)
    return kd, ce


def loss_chunk_(zs: Tensor, zt: Tensor | None, target: Tensor, cfg: KDConfig, weight: float,
                want_ce: bool = True, kd_w: Tensor | None = None, ce_w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """KD and CE sums over a chunk of trained rows; overwrites zs [C, V] with weight * d loss / d zs.

    zs, zt: [C, V] logits in the compute dtype (zt is scratch too: callers pass a buffer of their own;
    None = no teacher, CE only, needs alpha = 1);
    target: [C] label ids (used for CE; with alpha = 0 the CE sum is still returned, for logging, when
    want_ce says the labels are token ids);
    kd_w, ce_w: optional per-row weights [C] (an importance weight, a policy-gradient advantage): the loss is then
    sum_r [(1 - alpha) T^2 kd_w[r] D_r + ce_w[r] CE_r] (ce_w replaces alpha; either may be omitted).
    """
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, zs.shape[-1]))
    kd = zs.new_zeros(())
    ce = zs.new_zeros(())
    cut = lambda w, block: None if w is None else w[block]  # noqa: E731
    # One block-sized temporary for the whole chunk: fresh ones per block would each be new pages (glibc hands
    # blocks of MiBs back to the kernel on free), and page faults cost more than the arithmetic they serve.
    scratch = zs.new_empty(min(rows, zs.shape[0]), zs.shape[-1]) if zt is not None and zs.shape[0] > rows else None
    for start in range(0, zs.shape[0], rows):
        block = slice(start, start + rows)
        kd_b, ce_b = _loss_block_(zs[block], None if zt is None else zt[block], target[block], cfg, weight,
                                  want_ce, cut(kd_w, block), cut(ce_w, block), scratch)
        kd += kd_b
        ce += ce_b
    return kd, ce


def check_labels(target: Tensor, vocab: int, cfg: KDConfig, required: bool = False) -> bool:
    """Whether every trained label is a token id; CE (alpha > 0, or `required`: per-row CE weights) requires it.
    With alpha = 0 labels may be any non-ignored value (they only mark positions) and the CE sum is then not
    computed."""
    valid = not target.numel() or bool(target.min() >= 0 and target.max() < vocab)
    if (cfg.alpha > 0 or required) and not valid:
        bad = target[(target < 0) | (target >= vocab)][0].item()
        raise LmdistillError(
            f"labels: expected token ids in [0, {vocab}) or ignore_index={cfg.ignore_index}, found {bad}."
        )
    return valid
