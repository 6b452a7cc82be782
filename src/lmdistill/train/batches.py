"""Batch sources: where each optimizer step's token sequences come from, as registered parts.

The trainer asks its source for `batches(step)` (this process's micro-batches of a step, `lmdistill.data.batch.Batch`)
and nothing else. Each kind of source is a `SourceKind` registered here, which declares

- its options (`declare(add)`) and when the run uses it (`selected(values)`; the latest registered kind that is
  selected wins, the dataset stream is the fallback),
- what it needs: the data it reads (`data_mode`), the teacher capabilities it needs (`check`), the objective it
  trains with (`objective`), whether it generates (`generation`, for the dry run),
- how to build it over the dataset stream (`build(plan, dataset, trainer)`).

    @register_source
    class Reversed(SourceKind):
        name = "reversed"
        @staticmethod
        def declare(add): add("--reverse_replies", action="store_true", help="...")
        @classmethod
        def selected(cls, values): return values.get("reverse_replies", False)
        @classmethod
        def build(cls, plan, dataset, trainer): return MyStream(dataset)

`DatasetStream` is one seeded, epoch-by-epoch shuffled stream of the tokenized examples, where the step number
alone fixes which examples a step takes (resume is exact without saving a data-loader state). Process `rank` of
`world` takes micro-batch m of step s as examples [(m * world + rank) * bs, ...) of the step.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from lmdistill.data import pad_batch
from lmdistill.data.collate import pack_batch
from lmdistill.data.batch import Batch, TeacherTokens
from lmdistill.config import Registry


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
    """This process's micro-batches of an optimizer step (`Batch`es on the device). `last_stats` holds what the
    source reports about the step it built last (logged with the step's metrics); `groups` the objective's token
    groups its batches belong to (each normalized by its own token count), fixed for the run."""

    last_stats: dict = {}
    groups: tuple = (None,)

    def batches(self, step: int) -> list[Batch]:  # pragma: no cover - interface
        raise NotImplementedError


GROUP_WINDOW_STEPS = 64  # --group_by_length: examples of this many steps are sorted by length together


class DatasetStream(BatchSource):
    """`pack_rows`: several examples a row (`--packing`): rows as long as the micro-batch's longest example (at most
    `pack_rows`), so the padding goes and no row is longer than without packing (attention, which a dense mask makes
    quadratic in the row on CPU and in SDPA, costs no more); `group_by_length`: each
    window of GROUP_WINDOW_STEPS steps' examples sorted by length into micro-batches, their order shuffled (seeded)
    -- less padding, with the same examples per window. Both keep the step alone fixing which examples it takes."""

    def __init__(self, examples: Sequence[dict], pad_token_id: int, batch_size: int, accumulation_steps: int,
                 seed: int, world: int = 1, rank: int = 0, device: torch.device | str = "cpu",
                 pack_rows: int | None = None, group_by_length: bool = False):
        self.examples, self.pad, self.device = examples, pad_token_id, device
        self.batch_size, self.accumulation, self.world, self.rank = batch_size, accumulation_steps, world, rank
        self.stream, self.seed = ExampleStream(len(examples), seed), seed
        self.pack_rows, self.group_by_length, self._window = pack_rows, group_by_length, (None, [])

    @property
    def per_step(self) -> int:
        """Examples per optimizer step over all processes."""
        return self.batch_size * self.accumulation * self.world

    def micro_batch_indices(self, step: int, m: int) -> list[int]:
        """The examples of this process's micro-batch m of `step`."""
        bs = self.batch_size
        if not self.group_by_length:
            first = step * self.per_step + (m * self.world + self.rank) * bs
            return [self.stream[i] for i in range(first, first + bs)]
        chunks = self._grouped(step // GROUP_WINDOW_STEPS)
        return chunks[(step % GROUP_WINDOW_STEPS) * self.accumulation * self.world + m * self.world + self.rank]

    def _grouped(self, window: int) -> list[list[int]]:
        if self._window[0] != window:
            import random

            n = GROUP_WINDOW_STEPS * self.per_step
            indices = [self.stream[i] for i in range(window * n, (window + 1) * n)]
            lengths = getattr(self.examples, "lengths", None)
            length = (lambda i: int(lengths[i])) if lengths is not None else (
                lambda i: len(self.examples[i]["input_ids"]))
            indices.sort(key=lambda i: -length(i))  # stable: ties keep the seeded order
            chunks = [indices[k:k + self.batch_size] for k in range(0, n, self.batch_size)]
            random.Random(f"{self.seed}:{window}").shuffle(chunks)
            self._window = (window, chunks)
        return self._window[1]

    def batches(self, step: int) -> list[Batch]:
        out = []
        for m in range(self.accumulation):
            indices = self.micro_batch_indices(step, m)
            rows = [self.examples[i] for i in indices]
            if self.pack_rows:  # rows as long as the longest example: no padding, no row longer than unpacked
                longest = max(len(r["input_ids"]) for r in rows)
                packed = pack_batch(rows, self.pad, min(self.pack_rows, longest))
                out.append(Batch.of(packed, self.device, [indices[k] for k in packed["order"]]))
            else:
                out.append(Batch.of(pad_batch(rows, self.pad), self.device, indices))
        return out


class CrossTokenizerStream(BatchSource):
    """The dataset stream with the teacher's side of each micro-batch (`--cross_tokenizer`): its own tokens of the
    same examples and the aligned rows (`lmdistill.data.cross_tokenizer.cross_batch_fields`)."""

    def __init__(self, dataset: DatasetStream, teacher_pad: int):
        self.dataset, self.teacher_pad = dataset, teacher_pad

    def batches(self, step: int) -> list[Batch]:
        from lmdistill.data.cross_tokenizer import cross_batch_fields

        out, aligned = [], 0
        for batch in self.dataset.batches(step):
            examples = [self.dataset.examples[i] for i in batch.example_index]
            fields = cross_batch_fields(examples, batch.input_ids.shape[1], self.teacher_pad, self.dataset.device)
            aligned += len(fields["student_rows"])
            side = TeacherTokens(fields["teacher_input_ids"], fields["teacher_attention_mask"], fields["teacher_rows"],
                                 fields["student_rows"])
            out.append(batch.with_(teacher_tokens=side))
        self.last_stats = {"aligned_tokens": aligned}
        return out


# -- the registry --------------------------------------------------------------------------------------------
class SourceKind:
    """A kind of batch source (see the module docstring)."""

    name: ClassVar[str] = ""
    objective: ClassVar[str] = "kd"  # what `distill` minimizes on its batches (`lmdistill.train.objectives`)

    @staticmethod
    def declare(add: Callable) -> None:
        """Add this source's options to `lmdistill distill`."""

    @classmethod
    def selected(cls, values: Mapping[str, Any]) -> bool:
        return False

    @classmethod
    def data_mode(cls, values: Mapping[str, Any]) -> str:
        """examples (tokenized replies) | prompts (every reply is the student's) | cross (both tokenizations)."""
        return "examples"

    @classmethod
    def generates(cls, values: Mapping[str, Any]) -> bool:
        """Whether the student writes replies (the run needs a generator; the dry run counts its memory)."""
        return False

    @classmethod
    def check(cls, values: Mapping[str, Any], teacher) -> None:
        """Checks that need no model, e.g. the teacher capabilities the source needs (`teacher`: its spec tree)."""

    @classmethod
    def settings(cls, values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """What the plan keeps for `build` (`SourcePlan.get(key)`)."""
        return ()

    @classmethod
    def build(cls, plan, dataset: DatasetStream, trainer) -> BatchSource:
        """The source over the dataset stream. `trainer` gives `teacher`, `tokenizer`, `generator` (the student's
        replies: `trainer.generator.replies(prompts)`), `unwrapped()` (the student) and `device`."""
        return dataset


SOURCES = Registry("batch source")
register_source, unregister_source = SOURCES.register, SOURCES.unregister


def selected_source(values: Mapping[str, Any]) -> type[SourceKind]:
    """The run's source kind: the latest registered one that is selected (the dataset stream when none is)."""
    for kind in reversed(list(SOURCES.values())):
        if kind.selected(values):
            return kind
    return SOURCES["dataset"]


def declare_source_options(add: Callable) -> None:
    for kind in SOURCES.values():
        kind.declare(add)


@register_source
class DatasetSource(SourceKind):
    """The dataset's own replies (every run without another source)."""

    name = "dataset"


@register_source
class CrossTokenizerSource(SourceKind):
    """`--cross_tokenizer`: each batch also carries the teacher's tokenization of its examples."""

    name, objective = "cross_tokenizer", "cross_tokenizer"

    @classmethod
    def selected(cls, values) -> bool:
        return bool(values.get("cross_tokenizer"))

    @classmethod
    def data_mode(cls, values) -> str:
        return "cross"

    @classmethod
    def build(cls, plan, dataset: DatasetStream, trainer) -> BatchSource:
        return CrossTokenizerStream(dataset, trainer.teacher.pad_token_id)
