"""Examples -> a padded batch of tensors, one example a row (`pad_batch`) or several (`pack_batch`)."""

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


def pack_batch(examples: Sequence[dict], pad_token_id: int, row_tokens: int) -> dict:
    """Several examples per row (packing): rows of at most `row_tokens` tokens, filled first-fit in order of
    decreasing length, then right-padded to the longest row.

    Returns `input_ids`, `labels`, `attention_mask` (1 on real tokens) as `pad_batch` does, plus `position_ids`
    (R, T) restarting at 0 for every example and for the padding run, which is how transformers' attention keeps
    each example to itself (a block-diagonal causal mask, built from the position ids when no attention mask is
    passed), and `order`: the examples' indices in row-major order (the order of their trained positions). The
    first label of every example is -100: in a row it would be the next-token target of the example before it."""
    if not examples:
        raise LmdistillError("pack_batch: expected at least one example, found an empty batch.")
    lengths = [len(ex["input_ids"]) for ex in examples]
    if max(lengths) > row_tokens:
        raise LmdistillError(f"pack_batch: an example of {max(lengths)} tokens does not fit a row of {row_tokens}.")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda k: (-lengths[k], k)):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([]), room.append(row_tokens)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    order = [i for row in rows for i in sorted(row)]  # each row's examples in their original order
    rows = [sorted(row) for row in rows]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            input_ids[r, at:at + n] = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
            labels[r, at + 1:at + n] = torch.as_tensor(examples[i]["labels"][1:], dtype=torch.long)
            attention_mask[r, at:at + n] = 1
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids,
            "order": order}
