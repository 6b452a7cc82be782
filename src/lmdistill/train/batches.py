"""Batch sources: where each optimizer step's token sequences come from. The trainer asks `batches(step)` for
this process's micro-batches of a step and nothing else, so a new source (e.g. on-policy: the student writes the
replies) is a new class here, not a change to the trainer.

`DatasetStream` is today's source: one seeded, epoch-by-epoch shuffled stream of the tokenized examples, where
the step number alone fixes which examples a step takes (resume is exact without saving a data-loader state).
Process `rank` of `world` takes micro-batch m of step s as examples [(m * world + rank) * bs, ...) of the step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmdistill.data import pad_batch


class ExampleStream:
    """Example index i of the endless stream: epoch e = i // n is a permutation seeded by seed + e."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][i % self.n])


class BatchSource:
    """This process's micro-batches of an optimizer step: dicts of input_ids, attention_mask, labels [B, T] on
    the device, plus `example_index` (the examples' indices, for offline teachers). `last_stats` holds what the
    source reports about the step it built last (logged with the step's metrics)."""

    last_stats: dict = {}

    def batches(self, step: int) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError


class DatasetStream(BatchSource):
    def __init__(self, examples: Sequence[dict], pad_token_id: int, batch_size: int, accumulation_steps: int,
                 seed: int, world: int = 1, rank: int = 0, device: torch.device | str = "cpu"):
        self.examples, self.pad, self.device = examples, pad_token_id, device
        self.batch_size, self.accumulation, self.world, self.rank = batch_size, accumulation_steps, world, rank
        self.stream = ExampleStream(len(examples), seed)

    @property
    def per_step(self) -> int:
        """Examples per optimizer step over all processes."""
        return self.batch_size * self.accumulation * self.world

    def batches(self, step: int) -> list[dict]:
        bs, base, out = self.batch_size, step * self.per_step, []
        for m in range(self.accumulation):
            first = base + (m * self.world + self.rank) * bs
            indices = [self.stream[i] for i in range(first, first + bs)]
            padded = pad_batch([self.examples[i] for i in indices], self.pad)
            out.append({**{k: v.to(self.device) for k, v in padded.items()}, "example_index": indices})
        return out


class CrossTokenizerStream(BatchSource):
    """The dataset stream with the teacher's side of each micro-batch (`--cross_tokenizer`): its own tokens of the
    same examples and the aligned rows (`lmdistill.data.cross_tokenizer.cross_batch_fields`)."""

    def __init__(self, dataset: DatasetStream, teacher_pad: int):
        self.dataset, self.teacher_pad = dataset, teacher_pad

    def batches(self, step: int) -> list[dict]:
        from lmdistill.data.cross_tokenizer import cross_batch_fields

        out, aligned = [], 0
        for batch in self.dataset.batches(step):
            examples = [self.dataset.examples[i] for i in batch["example_index"]]
            fields = cross_batch_fields(examples, batch["input_ids"].shape[1], self.teacher_pad, self.dataset.device)
            aligned += len(fields["student_rows"])
            out.append({**batch, **fields})
        self.last_stats = {"aligned_tokens": aligned}
        return out
