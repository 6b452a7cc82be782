"""The Teacher interface: what the loop, the loss and eval ask of any teacher, whatever its source.

    scores = teacher.score(batch)    # TeacherScores of the batch's trained rows, read block by block by the loss
    teacher.vocab_size               # the real tokens compared (padded embedding rows excluded)
    teacher.stored_k                 # None, or the top k its scores are exact within (an offline cache)

Kinds (one file each): an online HF model (`online.py`), the offline top-k cache (`cache.py`), a teacher with its
own tokenizer (`cross_tokenizer.py`), an ensemble of teachers (`ensemble.py`). A new kind of teacher is a new
subclass plus its `TeacherKind` registered in `lmdistill.teachers.registry`; nothing else needs to change.
"""

from __future__ import annotations

from typing import Callable

from lmdistill.losses.scores import TeacherScores


class Teacher:
    """A frozen source of next-token distributions over the student's vocabulary."""

    name: str = "teacher"
    vocab_size: int
    stored_k: int | None = None
    # True when it can score only the examples it was built from (a cache), not any text (eval data)
    offline: bool = False
    # the output rows of its model (a padded lm_head may have more than the vocabulary); None without a model, when
    # vocab_size is what it has
    rows: int | None = None

    def score(self, batch) -> TeacherScores:  # pragma: no cover - interface
        """Scores of `batch` (a `lmdistill.data.batch.Batch`: input_ids, attention_mask, labels [B, T];
        example_index for offline teachers) at its trained positions, under no grad; called under the training
        step's autocast context."""
        raise NotImplementedError

    def members(self) -> list["Teacher"]:
        """The teachers it is made of (itself, for a single teacher); eval reports each."""
        return [self]

    def check_examples(self, examples) -> None:
        """Refuse examples it cannot score (an offline teacher: others than it was built from)."""

    def for_eval(self, examples) -> "Teacher | None":
        """A teacher that scores these held-out examples (by `example_index` into them): itself for a teacher that
        scores any text; an offline one's held-out part, or None when it has none for them."""
        return None if self.offline else self

    def stepper(self):
        """A `lmdistill.models.decode.Stepper`-like object giving its next-token logits one token at a time (for
        sampling from a teacher-student mixture, MiniLLM); None for a teacher that cannot score new text."""
        return None

    def prepare(self, prepare_model: Callable) -> None:
        """Let the launcher wrap its models (FSDP sharding); a teacher without a model ignores it."""

    def describe(self) -> str:
        return self.name
