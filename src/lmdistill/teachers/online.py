"""An online teacher: a frozen HF causal LM run on each micro-batch; its final hidden states and lm_head are
handed to the loss, which projects them to logits one token chunk at a time (no `[batch, seq, vocab]` logits)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmdistill.config import DTYPES, Repeated
from lmdistill.errors import LmdistillError
from lmdistill.losses.scores import ProjectedScores
from lmdistill.models import forward_hidden, lm_head_of
from lmdistill.models.hidden import full_weights
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.registry import (FULL_VOCABULARY, HIDDEN_STATES, SCORES_NEW_TEXT, STEPS_TOKENS, BuildContext,
                                         TeacherKind, TeacherSpec, register_teacher_kind)


class OnlineTeacher(Teacher):
    """`model` frozen (eval mode, no grad); `vocab_size` real tokens compared (its lm_head may be padded)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, name: str = "teacher"):
        head = lm_head_of(model)
        rows = head.weight.shape[0]
        if vocab_size is not None and vocab_size > rows:
            raise LmdistillError(f"{name}: expected at least {vocab_size} output rows (the vocabulary), found {rows}.")
        model.eval()
        model.requires_grad_(False)
        self.model, self.name, self.vocab_size = model, name, vocab_size or rows
        self.keep_layers: list[int] = []  # decoder layers whose outputs score() also returns (feature distillation)

    @property
    def rows(self) -> int:
        return lm_head_of(self.model).weight.shape[0]

    def score(self, batch) -> ProjectedScores:
        with torch.no_grad():
            out = forward_hidden(self.model, **batch.model_inputs(), layers=self.keep_layers)
            head = lm_head_of(self.model)
            weight, bias = full_weights(head)
        # Cohere/Granite scale and Gemma 2/3 softcap their logits: the loss applies the same, one chunk at a time
        scores = ProjectedScores(out.hidden, weight, bias, self.vocab_size, (head.logit_scale, head.softcap))
        scores.layers = out.layers  # {layer: [B, T, H]} of keep_layers, else None
        return scores

    def stepper(self):
        from lmdistill.models.decode import Stepper

        return Stepper(self.model)

    def prepare(self, prepare_model) -> None:
        self.model = prepare_model(self.model)
        self.model.eval()


@register_teacher_kind
class OnlineKind(TeacherKind):
    """`--teacher DIR` (repeatable): a local HF model run on each micro-batch."""

    name = "online"
    capabilities = frozenset({SCORES_NEW_TEXT, FULL_VOCABULARY, HIDDEN_STATES, STEPS_TOKENS})

    @staticmethod
    def declare(add) -> None:
        add("--teacher", action=Repeated, default=None, metavar="DIR",
            help="teacher: a local HF model folder (or a preset, for tests); repeat for an ensemble; required unless "
                 "--teacher_cache")
        add("--teacher_adapter", action=Repeated, default=None, metavar="DIR",
            help="LoRA adapter folder merged into the teacher at load; with several --teacher, one per teacher in "
                 "order")
        add("--teacher_dtype", action=Repeated, default=None, choices=DTYPES, metavar="DTYPE",
            help="teacher weights dtype, one of float32, bfloat16, float16; once for every teacher or once per "
                 "--teacher in order (default: bfloat16 under --dtype bfloat16, else float32)")

    @classmethod
    def specs(cls, values) -> list[TeacherSpec]:
        paths, adapters, dtypes = values["teacher"] or [], values["teacher_adapter"] or [], values["teacher_dtype"] or []
        if adapters and len(adapters) != len(paths):
            raise LmdistillError(f"--teacher_adapter: expected one per --teacher ({len(paths)}, in the same order), "
                                 f"found {len(adapters)}. A teacher cache already holds its (adapted) teacher's "
                                 "outputs: pass the adapter to `lmdistill cache-teacher` instead.")
        if len(dtypes) > 1 and len(dtypes) != len(paths):
            raise LmdistillError(f"--teacher_dtype: expected one (for every teacher) or one per --teacher "
                                 f"({len(paths)}, in the same order), found {len(dtypes)}.")
        given = dtypes or ["bfloat16" if values["dtype"] == "bfloat16" else "float32"]
        dtypes = given * len(paths) if len(given) == 1 else given
        adapters = adapters or [None] * len(paths)
        return [TeacherSpec(cls.name, str(p), "--teacher", a, d) for p, a, d in zip(paths, adapters, dtypes)]

    @classmethod
    def check(cls, spec: TeacherSpec, values) -> None:
        from lmdistill.models.loading import check_model_ref

        check_model_ref("--teacher", spec.ref)
        if spec.adapter and not (Path(spec.adapter) / "adapter_config.json").is_file():
            raise LmdistillError(f"--teacher_adapter: expected a LoRA adapter folder (adapter_config.json), found "
                                 f"{'no such folder' if not Path(spec.adapter).is_dir() else 'none'} at "
                                 f"'{spec.adapter}'.")

    @classmethod
    def tokenizer_dir(cls, spec: TeacherSpec) -> str | None:
        from lmdistill.tokenizer import has_tokenizer

        return spec.ref if has_tokenizer(spec.ref) else None

    @classmethod
    def shape(cls, spec: TeacherSpec, ctx: BuildContext) -> list:
        from lmdistill.models.shapes import TeacherShape, meta_model, model_shape

        model = meta_model(spec.ref, "--teacher", ctx.tokenizer)
        return [TeacherShape(spec.ref, model_shape(model, spec.ref), spec.dtype)]

    @classmethod
    def build(cls, spec: TeacherSpec, ctx: BuildContext) -> OnlineTeacher:
        from lmdistill.models import load_teacher

        own = spec.get("own_tokenizer")  # a cross-tokenizer teacher: checked against its own tokenizer
        model = load_teacher(spec.ref, adapter=spec.adapter, dtype=spec.dtype, device=ctx.device,
                             tokenizer=ctx.extra["teacher_tokenizer"] if own else ctx.tokenizer, verbose=ctx.is_main)
        return OnlineTeacher(model, None, name=spec.label if ctx.several else "teacher")
