"""Distillation losses: every divergence x {logits, fused lm_head chunks} x {dense, top-k teacher}.

    from lmdistill.losses import distillation_loss, fused_distillation_loss

See `functional.py` for the API and `divergences.py` for the formulas and their papers.
"""

from lmdistill.losses.divergences import ALIASES, DIVERGENCES, canonical_divergence
from lmdistill.losses.engine import KDConfig
from lmdistill.losses.functional import (
    LossParts,
    auto_chunk_size,
    distillation_loss,
    distillation_loss_parts,
    fused_distillation_loss,
    fused_cross_entropy_parts,
    fused_distillation_loss_parts,
    fused_teacher_distillation_loss_parts,
    fused_topk_distillation_loss_parts,
)
from lmdistill.losses.scores import ProjectedScores, TeacherScores

__all__ = [
    "ALIASES", "DIVERGENCES", "KDConfig", "LossParts", "auto_chunk_size", "canonical_divergence",
    "distillation_loss", "distillation_loss_parts", "fused_cross_entropy_parts", "fused_distillation_loss",
    "fused_distillation_loss_parts", "fused_teacher_distillation_loss_parts", "fused_topk_distillation_loss_parts",
    "ProjectedScores", "TeacherScores",
]
