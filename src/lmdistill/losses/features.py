"""Hidden-state (feature) distillation: the student's hidden states at chosen layers, mapped by a learned linear
projector to the teacher's width, matched to the teacher's hidden states at the layers they are paired with
(FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020, for transformers; DistillKit's hidden-state mode).

    lmdistill distill ... --feature_loss mse|cosine --feature_weight W --layer_map auto|"0:1,1:3"

A layer's hidden state is the output of decoder layer i (0-based, before the final norm). `auto` spreads the
student's layers evenly over the teacher's, the last onto the last: student layer s -> teacher layer
round((s + 1) * L_t / L_s) - 1. Per trained position (the positions whose next token the logit loss trains) and
pair, `mse` is the mean over the teacher's width of (P h_s - h_t)^2 and `cosine` is 1 - cos(P h_s, h_t); the term
is their sum over positions, averaged over the pairs, so the loop divides it by the trained-token count like every
other term: loss += W * feature. Projectors start at the identity when the widths are equal.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from lmdistill.errors import LmdistillError

KINDS = ("mse", "cosine")


def parse_layer_map(text: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """`auto` or "s:t,s:t,..." (0-based decoder layers; -1 is the last) -> [(student layer, teacher layer)]."""
    if text == "auto":
        return [(s, round((s + 1) * n_teacher / n_student) - 1) for s in range(n_student)]
    pairs = []
    for item in str(text).split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", item)
        if m is None:
            raise LmdistillError(f"--layer_map: expected auto or pairs 'student:teacher' separated by commas (e.g. "
                                 f"'0:1,1:3'), found '{text}'.")
        s, t = (int(x) for x in m.groups())
        s, t = s % n_student if -n_student <= s < 0 else s, t % n_teacher if -n_teacher <= t < 0 else t
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise LmdistillError(f"--layer_map '{item.strip()}': the student has layers 0..{n_student - 1} and the "
                                 f"teacher 0..{n_teacher - 1}.")
        pairs.append((s, t))
    if len({s for s, _ in pairs}) != len(pairs):
        raise LmdistillError(f"--layer_map '{text}': a student layer appears twice; map each student layer once.")
    return pairs


class FeatureProjectors(nn.Module):
    """One linear map (student width -> teacher width, no bias) per (student layer, teacher layer) pair."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in pairs)
        if student_width == teacher_width:
            with torch.no_grad():
                for m in self.maps:
                    m.weight.copy_(torch.eye(teacher_width))

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    def loss_sum(self, student: dict, teacher: dict, rows: Tensor, kind: str) -> Tensor:
        """The feature term: summed over the flat positions `rows`, averaged over the pairs (fp32)."""
        if kind not in KINDS:
            raise LmdistillError(f"--feature_loss: expected one of {', '.join(KINDS)}, found '{kind}'.")
        total = None
        for (s, t), proj in zip(self.pairs, self.maps):
            hs, ht = student[s], teacher[t]
            hs = hs.reshape(-1, hs.shape[-1]).index_select(0, rows)
            ht = ht.reshape(-1, ht.shape[-1]).index_select(0, rows).detach().float()
            p = proj(hs.to(proj.weight.dtype)).float()
            if kind == "mse":
                per_row = (p - ht).pow(2).mean(-1)
            else:
                per_row = 1.0 - nn.functional.cosine_similarity(p, ht, dim=-1, eps=1e-8)
            total = per_row.sum() if total is None else total + per_row.sum()
        return total / len(self.pairs)
