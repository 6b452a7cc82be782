"""What the loss engine needs from any teacher: its logits for a block of trained rows, one block at a time.

A `TeacherScores` describes one micro-batch as the engine sees it: the trained positions (labels != ignore_index,
in row-major order) numbered 0..n-1. The engine walks them in token chunks and asks `block(start, rows, out)` for
the teacher's T=1 logits of trained rows [start, start + len(rows)) -- `rows` holds their flat positions in the
batch -- written into `out` [len(rows), vocab_size] (fp32). It never asks for more than one chunk at a time, so no
teacher materializes `[tokens, vocab]` logits.

Every teacher source implements it (`lmdistill.teachers`): an online model (`ProjectedScores`, below: final hidden
states through the lm_head), the offline top-k cache (rows filled from the stored top-k and log-normalizer) and
an ensemble (the members' blocks combined). `stored_k` tells the engine when the logits are exact only within a top-k:
the loss then must use `top_k <= stored_k`, and divergences with a tail bucket need T=1.
"""

from __future__ import annotations

from torch import Tensor

from lmdistill.losses.projection import apply_head_, matmul_dtype, project_logits


class TeacherScores:
    """A teacher's scores for one micro-batch's trained rows (see the module docstring)."""

    vocab_size: int  # the real tokens compared (padded embedding rows excluded)
    stored_k: int | None = None  # the logits are exact only over each row's stored top k (a cache); None: all are

    @property
    def n_rows(self) -> int | None:
        """How many trained rows these scores hold, when they are stored per row (None: any rows of the batch)."""
        return None

    def block(self, start: int, rows: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ProjectedScores(TeacherScores):
    """An online teacher's final hidden states [..., H] (all positions of the batch) through its lm_head [V', H]
    (and bias), cut to the first `vocab_size` rows; `head` = (logit scale, softcap) of models that scale or softcap
    their logits (Cohere, Granite, Gemma 2/3), applied as the model's forward does."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int,
                 head: tuple[float, float | None] = (1.0, None)):
        self.hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        self.weight, self.bias = weight.detach()[:vocab_size], None if bias is None else bias.detach()[:vocab_size]
        self.vocab_size, self.head = vocab_size, head

    def block(self, start: int, rows: Tensor, out: Tensor) -> Tensor:
        h = self.hidden.index_select(0, rows)
        mm = matmul_dtype(out.device, self.weight)  # a bf16 teacher on CUDA: tensor cores, exact products, fp32 out
        z = project_logits(h.to(mm or out.dtype), self.weight, self.bias, out, mm)
        return apply_head_(z, self.head, None)
