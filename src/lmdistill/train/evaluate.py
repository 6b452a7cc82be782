"""Language-model metrics on the trained tokens of held-out examples.

    ce              mean cross-entropy (nats) of the model on trained tokens
    ppl             exp(ce)
    bits_per_byte   total CE in bits / UTF-8 bytes of the trained tokens' text: comparable across tokenizers
    entropy         mean entropy (nats) of the model's next-token distribution: near zero = near-certain predictions
    kl_to_teacher   mean forward KL(teacher || model) at T=1 on the same positions (with a teacher)
    agreement       fraction of positions where model and teacher rank the same token first (with a teacher)
    teacher_ce      the teacher's own CE on the same positions (with a teacher whose scores cover the vocabulary,
                    not a top-k cache): above `ce`, the teacher is worse than the model on this data

Logits are computed one token chunk at a time from the final hidden states, so evaluation has the same
memory bound as training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lmdistill.data import pad_batch, shift_labels
from lmdistill.data.batch import Batch
from lmdistill.models import forward_hidden, lm_head_of

EVAL_CHUNK_TOKENS = 256

__all__ = ["evaluate_lm", "shift_labels"]


def _text_bytes(tokenizer, examples: Sequence[dict]) -> int:
    """UTF-8 bytes of the trained tokens' text (each example's trained ids decoded together)."""
    total = 0
    for ex in examples:
        ids = [t for t in ex["labels"][1:] if t != -100]
        total += len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
    return total


def _as_teacher(teacher, vocab_size: int | None):
    """A Teacher, or a plain frozen model wrapped as one (`lmdistill eval --teacher`, the quickstart)."""
    from lmdistill.teachers import OnlineTeacher, Teacher

    return teacher if teacher is None or isinstance(teacher, Teacher) else OnlineTeacher(teacher, vocab_size)


def _teacher_stats(logq: torch.Tensor, scores, start: int, rows: torch.Tensor, vocab: int, suffix: str,
                   targets: torch.Tensor | None = None) -> dict:
    """Forward KL(teacher || model) at T=1 and top-1 agreement on one chunk, for one teacher's scores; with
    `targets` ([rows] token ids) also the teacher's summed CE."""
    z = scores.block(start, rows, torch.empty(len(rows), vocab, device=logq.device))
    logp = torch.log_softmax(z, -1)
    kl = torch.where(logp > -torch.inf, logp.exp() * (logp - logq), 0.0).sum()
    stats = {f"kl_sum{suffix}": kl.item(), f"agree{suffix}": (logp.argmax(-1) == logq.argmax(-1)).sum().item()}
    if targets is not None:
        stats["teacher_ce_sum"] = -logp.gather(-1, targets[:, None]).sum().item()
    return stats


@torch.no_grad()
def evaluate_lm(model, examples: Sequence[dict], tokenizer, teacher=None, batch_size: int = 8,
                max_batches: int | None = None, device=None, vocab_size: int | None = None) -> dict:
    """Metrics of `model` over `examples` (`input_ids`/`labels` dicts), and its KL to and agreement with
    `teacher` (a `lmdistill.teachers.Teacher` or a frozen model) and, for an ensemble, with each member
    (`kl_to_teacher_1`, `agreement_1`, ... in the order the teachers were given)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    head, teacher = lm_head_of(model), _as_teacher(teacher, vocab_size)
    vocab = teacher.vocab_size if teacher is not None else vocab_size or head.weight.shape[0]
    members = teacher.members() if teacher is not None and len(teacher.members()) > 1 else []
    exact = teacher is not None and (teacher.stored_k is None or teacher.stored_k >= vocab)  # a top-k cache has no exact CE
    sums: dict[str, float] = {}
    n_tokens, used = 0, []
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch_ex = examples[start : start + batch_size]
        used.extend(batch_ex)
        # example_index: for teachers that read caches
        batch = Batch.of(pad_batch(batch_ex, tokenizer.pad_token_id), device, list(range(start, start + len(batch_ex))))
        ys = shift_labels(batch.labels).reshape(-1)
        positions = (ys != -100).nonzero().squeeze(1)
        h = forward_hidden(model, batch.input_ids, batch.attention_mask).hidden.reshape(-1, head.weight.shape[1])
        scores = [] if teacher is None else [("", teacher.score(batch))]
        scores += [(f"_{i + 1}", m.score(batch)) for i, m in enumerate(members)]
        for s in range(0, len(positions), EVAL_CHUNK_TOKENS):
            rows = positions[s : s + EVAL_CHUNK_TOKENS]
            logq = torch.log_softmax(head.logits(h.index_select(0, rows)).float()[:, :vocab], -1)
            stats = {"ce_sum": -logq.gather(-1, ys[rows][:, None]).sum().item(),
                     "entropy_sum": -torch.where(logq > -torch.inf, logq.exp() * logq, 0.0).sum().item()}
            for suffix, sc in scores:
                targets = ys[rows] if exact and not suffix else None  # the teacher's own CE: the combined one
                stats.update(_teacher_stats(logq, sc, s, rows, vocab, suffix, targets))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        n_tokens += len(positions)
    model.train(was_training)
    n = max(n_tokens, 1)
    ce = sums.get("ce_sum", 0.0)
    result = {"ce": ce / n, "ppl": math.exp(min(ce / n, 700.0)), "tokens": n_tokens}
    result["bits_per_byte"] = ce / math.log(2) / max(_text_bytes(tokenizer, used), 1)
    result["entropy"] = sums.get("entropy_sum", 0.0) / n
    if exact:
        result["teacher_ce"] = sums.get("teacher_ce_sum", 0.0) / n
    for suffix in ([""] if teacher is not None else []) + [f"_{i + 1}" for i in range(len(members))]:
        result[f"kl_to_teacher{suffix}"] = sums.get(f"kl_sum{suffix}", 0.0) / n
        result[f"agreement{suffix}"] = sums.get(f"agree{suffix}", 0.0) / n
    return result
