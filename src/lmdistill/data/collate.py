"""Examples -> a padded batch of tensors."""

from __future__ import annotations

from typing import Sequence

import torch

from lmdistill.data.render import IGNORE_INDEX
from lmdistill.errors import LmdistillError


def pad_batch(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.LongTensor]:
    """Right-pad examples to their longest length.

    Returns `input_ids` (B, T) padded with `pad_token_id`, `labels` (B, T) padded with -100 and
    `attention_mask` (B, T), 1 on real tokens and 0 on padding.
    """
    if not examples:
        raise LmdistillError("pad_batch: expected at least one example, found an empty batch.")
    if pad_token_id is None:
        raise LmdistillError("pad_batch: pad_token_id is None; set the tokenizer's pad token (or use its eos).")
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise LmdistillError(f"pad_batch: example {row} has {n} input_ids but {len(example['labels'])} labels.")
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF-aligned labels [B, T] -> each position's next-token target [B, T] (-100 at the last position): the one
    definition of a trained position (targets != -100) that the loss, the cache and eval share."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
