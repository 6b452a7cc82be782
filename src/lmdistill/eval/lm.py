"""Language-model metrics on the trained tokens of held-out examples.

    ce              mean cross-entropy (nats) of the model on trained tokens
    ppl             exp(ce)
    bits_per_byte   total CE in bits / UTF-8 bytes of the trained tokens' text: comparable across tokenizers
    kl_to_teacher   mean forward KL(teacher || model) at T=1 on the same positions (with a teacher)
    agreement       fraction of positions where model and teacher rank the same token first (with a teacher)

Logits are computed one token chunk at a time from the final hidden states, so evaluation has the same
memory bound as training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lmdistill.data import pad_batch
from lmdistill.models import forward_hidden, lm_head_of

EVAL_CHUNK_TOKENS = 256


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF-aligned labels [B, T] -> targets for each position's next-token prediction [B, T]."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def _text_bytes(tokenizer, examples: Sequence[dict]) -> int:
    """UTF-8 bytes of the trained tokens' text (each example's trained ids decoded together)."""
    total = 0
    for ex in examples:
        ids = [t for t in ex["labels"][1:] if t != -100]
        total += len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
    return total


def _chunk_stats(h, head, ys, ht=None, head_t=None, vocab=None) -> dict[str, float]:
    logq = torch.log_softmax(head.logits(h).float()[:, :vocab], -1)
    out = {"ce_sum": -logq.gather(-1, ys[:, None]).sum().item()}
    if ht is not None:
        logp = torch.log_softmax(head_t.logits(ht).float()[:, :vocab], -1)
        out["kl_sum"] = (logp.exp() * (logp - logq)).sum().item()
        out["agree"] = (logp.argmax(-1) == logq.argmax(-1)).sum().item()
    return out


@torch.no_grad()
def evaluate_lm(model, examples: Sequence[dict], tokenizer, teacher=None, batch_size: int = 8,
                max_batches: int | None = None, device=None, vocab_size: int | None = None) -> dict:
    """Metrics of `model` (and agreement with `teacher`) over `examples` (`input_ids`/`labels` dicts)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    head, head_t = lm_head_of(model), (lm_head_of(teacher) if teacher is not None else None)
    sums = {"ce_sum": 0.0, "kl_sum": 0.0, "agree": 0.0}
    n_tokens, used = 0, []
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch_ex = examples[start : start + batch_size]
        used.extend(batch_ex)
        batch = {k: v.to(device) for k, v in pad_batch(batch_ex, tokenizer.pad_token_id).items()}
        ys = shift_labels(batch["labels"]).reshape(-1)
        rows = ys != -100
        h = forward_hidden(model, batch["input_ids"], batch["attention_mask"]).hidden.reshape(-1, head.weight.shape[1])[rows]
        ht = None
        if teacher is not None:
            ht = forward_hidden(teacher, batch["input_ids"], batch["attention_mask"]).hidden
            ht = ht.reshape(-1, ht.shape[-1])[rows]
        ys = ys[rows]
        for s in range(0, len(ys), EVAL_CHUNK_TOKENS):
            c = slice(s, s + EVAL_CHUNK_TOKENS)
            for k, v in _chunk_stats(h[c], head, ys[c], None if ht is None else ht[c], head_t, vocab_size).items():
                sums[k] += v
        n_tokens += len(ys)
    model.train(was_training)
    n = max(n_tokens, 1)
    result = {"ce": sums["ce_sum"] / n, "ppl": math.exp(min(sums["ce_sum"] / n, 700.0)), "tokens": n_tokens}
    result["bits_per_byte"] = sums["ce_sum"] / math.log(2) / max(_text_bytes(tokenizer, used), 1)
    if teacher is not None:
        result["kl_to_teacher"] = sums["kl_sum"] / n
        result["agreement"] = sums["agree"] / n
    return result
