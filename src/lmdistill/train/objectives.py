"""Objectives: what one micro-batch's loss is, picked once per run from the plan (`Objective.name`), never from
which fields a batch holds.

    ce               cross-entropy on the trained tokens (`lmdistill train`)
    kd               token-level distillation with the run's divergence, temperature, alpha, top_k (+ feature term)
    cross_tokenizer  ULD / GOLD on the positions both tokenizations share (`--cross_tokenizer`)
    minillm          MiniLLM's weighted single-step reverse KL and policy-gradient terms on sampled replies
                     (group "minillm"), and lm_coef x CE on the dataset replies (group "lm")

Each is a function `(trainer, batch, hidden_out, scale, loss_scale) -> LossParts`: the loss summed over the batch's
trained tokens times `scale`, with its named terms as plain sums. `loss_scale` (None under an fp16 loss scaler) goes
into the fused loss, which then adds the lm_head's gradient straight into an existing .grad on later micro-batches
instead of building a second [V, H] buffer; so backward must see the returned loss as is. A new objective is a
function registered with `register_objective`.
"""

from __future__ import annotations

from typing import Callable

from lmdistill.data import shift_labels
from lmdistill.errors import LmdistillError
from lmdistill.losses import fused_cross_entropy_parts, fused_teacher_distillation_loss_parts
from lmdistill.models import lm_head_of
from lmdistill.models.hidden import full_weights

OBJECTIVES: dict[str, Callable] = {}


def register_objective(name: str):
    """Register an objective function under `name` (a decorator)."""

    def add(fn: Callable) -> Callable:
        OBJECTIVES[name] = fn
        return fn

    return add


def objective_fn(name: str) -> Callable:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise LmdistillError(f"unknown objective '{name}'; registered: {', '.join(OBJECTIVES)}.") from None


def _head(trainer):
    head = lm_head_of(trainer.model)
    w, b = full_weights(head)
    return head, w, b


def _ce(trainer, out, targets, scale: float, loss_scale: float | None, coef: float = 1.0):
    head, w, b = _head(trainer)
    parts = fused_cross_entropy_parts(out.hidden, w, targets, reduction="sum", lm_head_bias=b,
                                      logit_scale=head.logit_scale, softcap=head.softcap,
                                      loss_scale=None if loss_scale is None else loss_scale * coef)
    if loss_scale is None:
        parts.loss = parts.loss * (scale * coef)
    return parts


@register_objective("ce")
def cross_entropy(trainer, batch, out, scale: float, loss_scale: float | None):
    return _ce(trainer, out, shift_labels(batch.labels), scale, loss_scale)


@register_objective("kd")
def distillation(trainer, batch, out, scale: float, loss_scale: float | None):
    o = trainer.plan.objective
    head, w, b = _head(trainer)
    targets = shift_labels(batch.labels)
    scores = trainer.teacher.score(batch)
    cfg = o.kd
    parts = fused_teacher_distillation_loss_parts(
        out.hidden, w, scores, targets, reduction="sum", student_lm_head_bias=b, divergence=cfg.divergence,
        temperature=trainer.temperature(), alpha=cfg.alpha, skew_lambda=cfg.skew_lambda, jsd_beta=cfg.jsd_beta,
        loss_scale=loss_scale, student_logit_scale=head.logit_scale, student_softcap=head.softcap,
        **({"top_k": o.loss_top_k} if o.loss_top_k else {}))
    if trainer.projectors is not None:  # hidden-state distillation on the same trained positions
        rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
        feature = trainer.projectors.loss_sum(out.layers, scores.layers, rows, o.feature.loss)
        parts.loss = parts.loss + (o.feature.weight * scale) * feature
        parts.terms["feature"] = feature.item()
    if loss_scale is None:
        parts.loss = parts.loss * scale
    return parts


@register_objective("cross_tokenizer")
def cross_tokenizer(trainer, batch, out, scale: float, loss_scale: float | None):
    from lmdistill.losses.cross_tokenizer import cross_tokenizer_loss_parts

    o, teacher = trainer.plan.objective, trainer.teacher
    _, w, b = _head(trainer)
    aligned = teacher.score(batch)
    parts = cross_tokenizer_loss_parts(
        out.hidden, w, b, shift_labels(batch.labels), batch.teacher_tokens.student_rows, aligned.hidden,
        aligned.weight, aligned.bias, o.cross_tokenizer, teacher.student_vocab, teacher.vocab_size,
        temperature=trainer.temperature(), alpha=o.kd.alpha, top_k=o.loss_top_k, shared=teacher.shared)
    parts.loss = parts.loss * scale
    return parts


@register_objective("minillm")
def minillm(trainer, batch, out, scale: float, loss_scale: float | None):
    if batch.group == "lm":  # the dataset's replies: lm_coef x CE
        parts = _ce(trainer, out, shift_labels(batch.labels), scale, loss_scale, trainer.plan.objective.lm_coef)
        parts.terms = {"lm": parts.terms["ce"]}
        return parts
    head, w, b = _head(trainer)
    parts = fused_teacher_distillation_loss_parts(
        out.hidden, w, trainer.teacher.score(batch), shift_labels(batch.labels), reduction="sum",
        student_lm_head_bias=b, divergence="reverse_kl", kd_weights=batch.kd_weights, ce_weights=batch.ce_weights,
        loss_scale=loss_scale, student_logit_scale=head.logit_scale, student_softcap=head.softcap)
    parts.terms = {"rkl": parts.terms["kd"], "pg": parts.terms["ce"]}
    if loss_scale is None:
        parts.loss = parts.loss * scale
    return parts
