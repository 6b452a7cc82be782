"""From checked command-line options to what the loop needs: student, frozen teacher (or cache), examples.

The checks that need no model run before this, in `preflight.py`; the ones here need the models (output rows
against the tokenizer; padded embedding rows ignored).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from lmdistill.errors import LmdistillError


@dataclass
class Setup:
    tokenizer: Any
    student: torch.nn.Module
    teacher: Any | None  # a lmdistill.teachers.Teacher (online, cached or an ensemble); None for CE training
    examples: Any
    eval_examples: Any | None


def compared_vocabulary(tokenizer, student, teacher_rows: list[int]) -> int:
    """The number of logits compared: every row when the student and all teachers have the same output size,
    else the tokenizer's length (padded embedding rows, e.g. Qwen2.5-7B's 152,064 vs 0.5B's 151,936, are never
    real tokens)."""
    vs, n = student.get_output_embeddings().weight.shape[0], len(tokenizer)
    for name, rows in [("student", vs), *((f"teacher {i + 1}", r) for i, r in enumerate(teacher_rows))]:
        if rows < n:
            raise LmdistillError(f"the tokenizer has {n} tokens but the {name} has only {rows} output rows; the "
                                 "model does not belong to this tokenizer.")
    return vs if all(r == vs for r in teacher_rows) else n


def _model_overrides(args) -> dict:
    keys = ("hidden_size", "num_layers", "use_moe")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def build_student(args, name: str, tokenizer, device) -> torch.nn.Module:
    from lmdistill.models import PRESETS, apply_lora, load_model

    overrides = _model_overrides(args) if name in PRESETS else {}
    model = load_model(name, tokenizer=tokenizer, dtype="float32", device=device, **overrides)
    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    if args.lora_r:
        targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)
    return model


def teacher_dtypes(args) -> list[str]:
    """One weights dtype per --teacher: --teacher_dtype given once applies to all (default: bf16 under --dtype
    bfloat16, else fp32)."""
    n = len(args.teacher or [])
    given = args.teacher_dtype or ["bfloat16" if args.dtype == "bfloat16" else "float32"]
    return given * n if len(given) == 1 else list(given)


def build(args: argparse.Namespace, plan, device, is_main: bool) -> Setup:
    """Everything the loop needs, from the options of `train` or `distill` already checked by `preflight.check`
    (`plan` holds the tokenizer it resolved)."""
    from lmdistill.data import load_examples, prompt_examples

    tokenizer, teacher = plan.tokenizer, None
    # the data first: a bad record stops the run before any model loads
    minillm = getattr(args, "method", "kd") == "minillm"
    cross = getattr(args, "cross_tokenizer", None)
    if cross:
        from lmdistill.data.cross_tokenizer import load_cross_examples
        from lmdistill.tokenizer import load_tokenizer

        teacher_tokenizer = load_tokenizer(args.teacher[0], "--teacher")
        examples = load_cross_examples(args.data, tokenizer, teacher_tokenizer, args.max_seq_len, args.data_format,
                                       args.skip_bad_records)
        if is_main:
            print(f"train data: {examples.stats.summary()}")
    elif getattr(args, "on_policy_fraction", 0) >= 1 or (minillm and args.lm_coef == 0):
        # every reply is the student's: the data's prompts suffice
        examples = prompt_examples(args.data, tokenizer, args.max_seq_len, args.data_format)
        if is_main:
            print(f"train data: {args.data}: {len(examples):,} prompts (fully on-policy: the student writes every "
                  "reply)")
    else:
        try:
            examples = load_examples(args.data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)
        except LmdistillError as exc:
            if minillm and "without any assistant turn" in str(exc):
                raise LmdistillError(f"{exc} --method minillm trains CE on the dataset's replies (--lm_coef "
                                     f"{args.lm_coef:g}); for prompts-only data pass --lm_coef 0.") from None
            raise
        if is_main:
            print(f"train data: {examples.stats.summary()}")
    eval_examples = None
    if args.eval_data:
        eval_examples = load_examples(args.eval_data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)
    if is_main and eval_examples is not None:
        print(f"eval data: {eval_examples.stats.summary()}")
    if args.command == "train":
        student = build_student(args, args.model, tokenizer, device)
    elif cross:
        teacher, student = build_cross_teacher(args, tokenizer, teacher_tokenizer, device, is_main)
    else:
        teacher, student = build_teacher(args, tokenizer, device, is_main)
    if teacher is not None:
        teacher.check_examples(examples)
    if getattr(args, "feature_loss", None):
        attach_projectors(args, student, teacher, is_main)
    return Setup(tokenizer, student, teacher, examples, eval_examples)


def attach_projectors(args, student, teacher, is_main: bool) -> None:
    """Feature distillation: the layer pairs of --layer_map, their projectors attached to the student (so the
    optimizer, DDP and checkpoints carry them), and the teacher told which of its layers to keep."""
    from lmdistill.losses.features import FeatureProjectors, parse_layer_map
    from lmdistill.models.hidden import decoder_layers, unwrap
    from lmdistill.train.state import PROJECTORS_ATTR

    width = lambda m: unwrap(m).config.get_text_config().hidden_size  # noqa: E731
    pairs = parse_layer_map(args.layer_map, len(decoder_layers(student)), len(decoder_layers(teacher.model)))
    projectors = FeatureProjectors(pairs, width(student), width(teacher.model))
    student.add_module(PROJECTORS_ATTR, projectors.to(next(student.parameters()).device))
    teacher.keep_layers = projectors.teacher_layers
    if is_main:
        print(f"feature distillation ({args.feature_loss}, weight {args.feature_weight:g}): student:teacher layers "
              f"{', '.join(f'{s}:{t}' for s, t in pairs)}; {sum(p.numel() for p in projectors.parameters()):,} "
              "projector parameters")


def build_cross_teacher(args, tokenizer, teacher_tokenizer, device, is_main: bool):
    """--cross_tokenizer: the teacher with its own tokenizer (its rows checked against it), the student with the
    run's; for gold, the tokens the two vocabularies share."""
    from lmdistill.losses.cross_tokenizer import shared_vocabulary
    from lmdistill.models import load_teacher
    from lmdistill.teachers.cross_tokenizer import CrossTokenizerTeacher

    model = load_teacher(args.teacher[0], adapter=(args.teacher_adapter or [None])[0], dtype=teacher_dtypes(args)[0],
                         device=device, tokenizer=teacher_tokenizer, verbose=is_main)
    student = build_student(args, args.student, tokenizer, device)
    compared_vocabulary(teacher_tokenizer, model, [])
    compared_vocabulary(tokenizer, student, [])
    teacher = CrossTokenizerTeacher(model, len(teacher_tokenizer))
    teacher.student_vocab, teacher.pad_token_id = len(tokenizer), teacher_tokenizer.pad_token_id or 0
    teacher.shared = shared_vocabulary(tokenizer, teacher_tokenizer) if args.cross_tokenizer == "gold" else None
    if is_main and teacher.shared is not None:
        print(f"gold: {len(teacher.shared[0]):,} tokens stand for the same bytes in both vocabularies "
              f"({len(tokenizer):,} student, {len(teacher_tokenizer):,} teacher); the rest are compared by ULD")
    return teacher, student


def build_teacher(args, tokenizer, device, is_main: bool):
    """The run's Teacher (one teacher, or an ensemble of the --teacher and --teacher_cache ones, in that order)
    and the student; each teacher loads in its own dtype, one after the other."""
    from lmdistill.models import load_teacher
    from lmdistill.teachers import CachedTeacher, EnsembleTeacher, OnlineTeacher, TeacherCache

    paths, adapters = args.teacher or [], args.teacher_adapter or [None] * len(args.teacher or [])
    models = [load_teacher(p, adapter=a, dtype=d, device=device, tokenizer=tokenizer, verbose=is_main)
              for p, a, d in zip(paths, adapters, teacher_dtypes(args))]
    caches = [TeacherCache(c) for c in args.teacher_cache or []]
    student = build_student(args, args.student, tokenizer, device)
    rows = [m.get_output_embeddings().weight.shape[0] for m in models] + [c.vocab_size for c in caches]
    vocab = compared_vocabulary(tokenizer, student, rows) if models else _cache_vocabulary(caches, student)
    several = len(paths) + len(caches) > 1
    members = [OnlineTeacher(m, vocab, name=f"--teacher {p}" if several else "teacher") for m, p in zip(models, paths)]
    members += [CachedTeacher(c, args.top_k, name=f"--teacher_cache {c.folder}") for c in caches]
    if not several:
        return members[0], student
    ensemble = EnsembleTeacher(members, args.teacher_weights, args.ensemble)
    if is_main:
        print(ensemble.describe())
    return ensemble, student


def _cache_vocabulary(caches, student) -> int:
    rows = student.get_output_embeddings().weight.shape[0]
    vocab = caches[0].vocab_size
    if rows < vocab or any(c.vocab_size != vocab for c in caches):
        raise LmdistillError(f"--student: the teacher cache's vocabulary has {vocab} tokens but the student only {rows} "
                             "output rows." if rows < vocab else "the teacher caches hold different vocabularies.")
    return vocab
