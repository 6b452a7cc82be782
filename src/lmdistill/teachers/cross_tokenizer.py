"""A teacher with its own tokenizer (`--cross_tokenizer uld|gold`): it reads each example in its own rendering
(`batch.teacher_tokens`, made by `lmdistill.data.cross_tokenizer`) and gives its final hidden states at the
positions aligned with the student's; the loss projects them one chunk at a time
(`lmdistill.losses.cross_tokenizer.cross_tokenizer_loss_parts`). It cannot score the student's own tokens, so eval
reports the student's CE and bits per byte, not a KL to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.errors import LmdistillError
from lmdistill.models import forward_hidden, lm_head_of
from lmdistill.models.hidden import full_weights
from lmdistill.teachers.online import OnlineTeacher
from lmdistill.teachers.registry import (OWN_TOKENIZATION, BuildContext, TeacherKind, TeacherSpec,
                                         register_teacher_kind)

MODES = ("uld", "gold")


@dataclass
class AlignedScores:
    """The teacher's final hidden states at the aligned positions [n, Ht] and its lm_head (weight [Vt, Ht], bias):
    what the cross-tokenizer losses project, one chunk of rows at a time."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


class CrossTokenizerTeacher(OnlineTeacher):
    offline = False

    def __init__(self, model: torch.nn.Module, vocab_size: int, name: str = "teacher"):
        super().__init__(model, vocab_size, name)
        head = lm_head_of(model)
        if head.logit_scale != 1.0 or head.softcap:
            raise LmdistillError(f"{name} scales or softcaps its logits; the cross-tokenizer losses do not support "
                                 "that yet (the token-level losses do).")
        self.student_vocab, self.pad_token_id, self.shared = vocab_size, 0, None

    def score(self, batch) -> AlignedScores:
        """Its hidden states at `batch.teacher_tokens.rows`, with its lm_head, under no grad."""
        side = batch.teacher_tokens
        with torch.no_grad():
            hidden = forward_hidden(self.model, side.input_ids, side.attention_mask).hidden
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.rows)
            weight, bias = full_weights(lm_head_of(self.model))
        return AlignedScores(rows, weight, bias)

    def for_eval(self, examples):
        return None  # its distribution is over another vocabulary: no KL or agreement to report

    def stepper(self):
        return None  # it cannot continue the student's tokens


@register_teacher_kind
class CrossTokenizerKind(TeacherKind):
    """`--cross_tokenizer uld|gold`: the one online --teacher keeps its own tokenizer and chat template."""

    name, wraps = "cross_tokenizer", True
    capabilities = frozenset({OWN_TOKENIZATION})

    @staticmethod
    def declare(add) -> None:
        add("--cross_tokenizer", default=None, choices=list(MODES),
            help="teacher and student with different tokenizers: uld = distance between sorted next-token "
                 "distributions; gold = exact on tokens both vocabularies share, uld on the rest (default: one shared "
                 "tokenizer)")

    @classmethod
    def wrap(cls, specs: list[TeacherSpec], values) -> list[TeacherSpec]:
        mode = values["cross_tokenizer"]
        if not mode:
            return specs
        flag = f"--cross_tokenizer {mode}"
        if len(specs) != 1 or specs[0].kind != "online":
            raise LmdistillError(f"{flag}: distills from one online --teacher (a teacher cache holds no alignment to "
                                 "the student's tokens; ensembles are not combined across tokenizers).")
        conflicts = [
            (values["method"] != "kd", "--method minillm"),
            (values["on_policy_fraction"] > 0, "--on_policy_fraction"),
            (bool(values["feature_loss"]), "--feature_loss"),
            (bool(values["via"]), "--via"),
        ]
        for bad, what in conflicts:
            if bad:
                raise LmdistillError(f"{flag}: not combined with {what} yet.")
        member = TeacherSpec(**{**specs[0].__dict__, "settings": (("own_tokenizer", True),)})
        return [TeacherSpec(cls.name, members=(member,), settings=(("mode", mode),))]

    @classmethod
    def check(cls, spec: TeacherSpec, values) -> None:
        from lmdistill.tokenizer import has_tokenizer, load_tokenizer

        teacher = spec.members[0].ref
        if not has_tokenizer(teacher):
            raise LmdistillError(f"--cross_tokenizer: --teacher '{teacher}' has no tokenizer files; the teacher reads "
                                 "the data with its own tokenizer and chat template.")
        load_tokenizer(teacher, "--teacher")

    @classmethod
    def build(cls, spec: TeacherSpec, ctx: BuildContext) -> CrossTokenizerTeacher:
        from lmdistill.data.alignment import shared_vocabulary

        teacher_tokenizer = ctx.extra["teacher_tokenizer"]
        model = ctx.members[0].model
        teacher = CrossTokenizerTeacher(model, len(teacher_tokenizer))
        teacher.student_vocab, teacher.pad_token_id = len(ctx.tokenizer), teacher_tokenizer.pad_token_id or 0
        teacher.shared = shared_vocabulary(ctx.tokenizer, teacher_tokenizer) if spec.get("mode") == "gold" else None
        if ctx.is_main and teacher.shared is not None:
            print(f"gold: {len(teacher.shared[0]):,} tokens stand for the same bytes in both vocabularies "
                  f"({len(ctx.tokenizer):,} student, {len(teacher_tokenizer):,} teacher); the rest are compared by "
                  "ULD")
        return teacher
