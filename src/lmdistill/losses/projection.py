"""Projecting hidden states to logits one chunk at a time, and back: the matmuls of the fused loss and of every
teacher's scores (`lmdistill.losses.scores`), with the heads that scale or softcap their logits.

On CPU the operands are fp32 (exact); on CUDA, low-precision weights or autocast take tensor-core GEMMs with fp32
accumulation and fp32 output (`matmul_dtype`), so the logits are fp32 everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

# bf16/fp16 weights are upcast to fp32 in vocabulary tiles of at most this many bytes.
WEIGHT_TILE_BYTES = 64 * 2**20
# On CPU, logits of large lm_heads are computed in vocabulary tiles whose [tile, chunk] output has this size.
CPU_TILE_BYTES = 1 * 2**20


LOW_PRECISION = (torch.bfloat16, torch.float16)


def matmul_dtype(device: torch.device, weight: Tensor) -> torch.dtype | None:
    """The dtype of the loss's matmul operands. On CUDA: the autocast dtype when autocast is on (what the model's own
    lm_head would use), else a low-precision weight's own dtype -- tensor-core GEMMs with fp32 accumulation and fp32
    output, so the logits are fp32 as everywhere else. None (fp32 operands) on CPU and for fp32 models without
    autocast: there the loss is exact in fp32."""
    if device.type != "cuda":
        return None
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return weight.dtype if weight.dtype in LOW_PRECISION else None


def _mm_f32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b for low-precision operands, accumulated and returned in fp32: cuBLAS's mixed-precision GEMM on CUDA
    (`out_dtype`); elsewhere (tests, or a torch without it) the same products in fp32, which is exact for
    bf16/fp16 operands (their products fit fp32) and differs only in summation order."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32, **({} if out is None else {"out": out}))
        except (RuntimeError, TypeError):  # no mixed-precision GEMM in this build: upcast (slower, same products)
            pass
    return torch.mm(a.float(), b.float(), **({} if out is None else {"out": out}))


def project_logits(h: Tensor, W: Tensor, b: Tensor | None, out: Tensor, mm_dtype: torch.dtype | None = None) -> Tensor:
    """out [C, V] = h @ W.T + b in out's dtype; low-precision weights are upcast tile by tile.

    On CPU, for large weights (Qwen's lm_head), the product is taken as W_tile @ h.T per vocabulary tile of
    CPU_TILE_BYTES written straight into the transposed view of out's columns (MKL takes the column-major
    output as is): that operand order runs ~25% faster than h @ W.T when C is a few hundred tokens, which is
    what token chunks are (benchmarks/loss_engine.py). Small weights gain nothing and take one matmul.
    `mm_dtype` (CUDA, `matmul_dtype`): the operands go to the GEMM in that dtype (h may already be in it), fp32 out."""
    dt = out.dtype
    if mm_dtype is not None:
        h_mm = h.to(mm_dtype)
        if W.dtype == mm_dtype:
            _mm_f32(h_mm, W.t(), out=out)
        else:
            tile = max(1, WEIGHT_TILE_BYTES // (W.shape[1] * out.element_size()))
            for s in range(0, W.shape[0], tile):
                out[:, s : s + tile] = _mm_f32(h_mm, W[s : s + tile].to(mm_dtype).t())
        return out if b is None else out.add_(b.to(dt))
    transposed = out.device.type == "cpu" and W.numel() * out.element_size() > WEIGHT_TILE_BYTES
    if W.dtype == dt and not transposed:
        torch.mm(h, W.t(), out=out)
    else:
        tile = max(1, WEIGHT_TILE_BYTES // (W.shape[1] * out.element_size()))
        if transposed:
            tile = min(tile, max(1, CPU_TILE_BYTES // (out.shape[0] * out.element_size())))
        hT = h.t()
        for s in range(0, W.shape[0], tile):
            w = W[s : s + tile] if W.dtype == dt else W[s : s + tile].to(dt)
            if transposed:
                torch.mm(w, hT, out=out[:, s : s + tile].t())
            else:
                out[:, s : s + tile] = h @ w.t()
    if b is not None:
        out.add_(b.to(dt))
    return out


def _project_back(g: Tensor, W: Tensor, g_mm: Tensor | None = None) -> Tensor:
    """g [C, V] @ W [V, H] in g's dtype; low-precision weights are upcast tile by tile. With `g_mm` (g cast to the
    matmul dtype, CUDA) the GEMM takes low-precision operands and returns fp32."""
    tile = max(1, WEIGHT_TILE_BYTES // (W.shape[1] * g.element_size()))
    if g_mm is not None:
        if W.dtype == g_mm.dtype:
            return _mm_f32(g_mm, W)
        return sum(_mm_f32(g_mm[:, s : s + tile], W[s : s + tile].to(g_mm.dtype)) for s in range(0, W.shape[0], tile))
    if W.dtype == g.dtype:
        return g @ W
    return sum(g[:, s : s + tile] @ W[s : s + tile].to(g.dtype) for s in range(0, W.shape[0], tile))


def _add_weight_grad_(dW: Tensor, g: Tensor, h: Tensor, first: bool, alpha: float, g_mm: Tensor | None) -> None:
    """dW [V, H] (+)= alpha * g.T @ h for one chunk; `first`: dW holds nothing yet (set, not add). With g_mm (g in the
    low-precision matmul dtype of h, CUDA) the products come from fp32-output GEMMs, per vocabulary tile when adding."""
    if g_mm is None:
        if first:
            torch.mm(g.t(), h, out=dW)
        else:
            dW.addmm_(g.t(), h, alpha=alpha)
        return
    if first and alpha == 1.0:
        _mm_f32(g_mm.t(), h, out=dW)
        return
    tile = max(1, WEIGHT_TILE_BYTES // (dW.shape[1] * dW.element_size()))
    for s in range(0, dW.shape[0], tile):
        part = _mm_f32(g_mm[:, s : s + tile].t(), h)
        if first:
            dW[s : s + tile] = part.mul_(alpha)
        else:
            dW[s : s + tile].add_(part, alpha=alpha)




def apply_head_(z: Tensor, head: tuple[float, float | None], keep: Tensor | None) -> Tensor:
    """Logits of a head that scales or softcaps, in place: z <- cap * tanh(scale * z / cap) (or scale * z);
    `keep` [C, V] receives tanh(scale * z / cap) for the gradient (softcap only)."""
    scale, cap = head
    if cap:
        z.mul_(scale / cap).tanh_()
        if keep is not None:
            keep.copy_(z)
        return z.mul_(cap)
    return z.mul_(scale) if scale != 1.0 else z


def _head_backward_(g: Tensor, head: tuple[float, float | None], kept: Tensor | None) -> Tensor:
    """d loss / d raw logits from d loss / d logits (in place in g): scale * (1 - tanh^2) with a softcap."""
    scale, cap = head
    if cap:
        g.mul_(kept.mul_(kept).sub_(1.0).mul_(-scale))  # kept = tanh(scale * z / cap): d/dz = scale (1 - tanh^2)
    elif scale != 1.0:
        g.mul_(scale)
    return g


NO_HEAD = (1.0, None)  # (logit scale, softcap) of a plain lm_head
