"""The micro-batch every batch source produces and every teacher and objective reads: a typed record instead of a
string-keyed dict.

    batch.input_ids, batch.attention_mask, batch.labels    # [B, T] on the device; labels -100 where untrained
    batch.example_index                                   # the examples' indices in the data (offline teachers)
    batch.group                                           # the objective's token group (None: the only one)
    batch.teacher_tokens                                  # a teacher with its own tokenizer: its side of the batch
    batch.position_ids                                    # packed rows: positions restarting per example

Which loss a batch gets is the run's objective's decision (`lmdistill.train.objectives`), never a matter of which
fields a batch happens to hold: `group` only tells an objective with several token groups (MiniLLM's sampled
replies and the dataset's replies) which one a batch belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor


@dataclass
class TeacherTokens:
    """The teacher's side of a micro-batch when it reads the data with its own tokenizer (`--cross_tokenizer`):
    its tokens [B, Tt] and the aligned positions, flat indices into the student's [B, T] and the teacher's [B, Tt]
    (`lmdistill.data.cross_tokenizer.cross_batch_fields`)."""

    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor  # [n] positions in the teacher's batch
    student_rows: Tensor  # [n] the aligned positions in the student's batch


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    example_index: list[int] = field(default_factory=list)
    group: str | None = None  # the objective's token group (e.g. MiniLLM's "minillm" / "lm"); None: the only one
    kd_weights: Tensor | None = None  # per trained token (MiniLLM's importance weights)
    ce_weights: Tensor | None = None
    teacher_tokens: TeacherTokens | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what a new batch source hands its own objective
    position_ids: Tensor | None = None  # packed rows (several examples a row): positions restart per example

    @classmethod
    def of(cls, padded: dict[str, Tensor], device, example_index: list[int], **fields) -> "Batch":
        """A batch from `pad_batch`'s (or `pack_batch`'s) tensors, moved to `device`."""
        if "position_ids" in padded:
            fields["position_ids"] = padded["position_ids"].to(device)
        return cls(padded["input_ids"].to(device), padded["attention_mask"].to(device), padded["labels"].to(device),
                   list(example_index), **fields)

    def model_inputs(self) -> dict[str, Tensor | None]:
        """What a model's forward takes: ids and the attention mask; for packed rows the position ids and no mask
        (transformers then keeps each example to itself, from where the positions restart)."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "attention_mask": None, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def with_(self, **fields) -> "Batch":
        """A copy with some fields replaced."""
        return replace(self, **fields)
