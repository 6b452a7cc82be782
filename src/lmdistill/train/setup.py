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
    teacher: torch.nn.Module | None
    examples: Any
    eval_examples: Any | None
    vocab_size: int | None  # compare only the first vocab_size logits (padded embeddings), None = all
    teacher_cache: Any | None = None  # lmdistill.teachers.TeacherCache instead of an online teacher


def check_vocabularies(tokenizer, student, teacher) -> int | None:
    """The number of logits to compare: None (all) when both heads have the same size, else the tokenizer's
    length (padded embedding rows, e.g. Qwen2.5-7B's 152,064 vs 0.5B's 151,936, are never real tokens)."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    n = len(tokenizer)
    if min(vs, vt) < n:
        raise LmdistillError(f"the tokenizer has {n} tokens but the {'student' if vs < n else 'teacher'} has only "
                             f"{min(vs, vt)} output rows; the model does not belong to this tokenizer.")
    return None if vs == vt else n


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


def teacher_dtype(args) -> str:
    return args.teacher_dtype or ("bfloat16" if args.dtype == "bfloat16" else "float32")


def build(args: argparse.Namespace, plan, device, is_main: bool) -> Setup:
    """Everything the loop needs, from the options of `train` or `distill` already checked by `preflight.check`
    (`plan` holds the tokenizer it resolved)."""
    from lmdistill.data import load_examples
    from lmdistill.models import load_teacher

    tokenizer, teacher, cache = plan.tokenizer, None, None
    if args.command == "train":
        student, vocab = build_student(args, args.model, tokenizer, device), None
    elif args.teacher_cache:
        student, cache, vocab = _cached_teacher_setup(args, tokenizer, device)
    else:
        teacher = load_teacher(args.teacher, adapter=args.teacher_adapter, dtype=teacher_dtype(args), device=device,
                               tokenizer=tokenizer, verbose=is_main)
        student = build_student(args, args.student, tokenizer, device)
        vocab = check_vocabularies(tokenizer, student, teacher)
    examples = load_examples(args.data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)
    if cache is not None:
        cache.check_examples(examples)
    eval_examples = None
    if args.eval_data:
        eval_examples = load_examples(args.eval_data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)
    if is_main:
        print(f"train data: {examples.stats.summary()}")
        if eval_examples is not None:
            print(f"eval data: {eval_examples.stats.summary()}")
    return Setup(tokenizer, student, teacher, examples, eval_examples, vocab, cache)


def _cached_teacher_setup(args, tokenizer, device):
    """Student, cache and compared vocabulary for `distill --teacher_cache DIR` (options checked by preflight)."""
    from lmdistill.teachers import TeacherCache

    cache = TeacherCache(args.teacher_cache)
    student = build_student(args, args.student, tokenizer, device)
    rows = student.get_output_embeddings().weight.shape[0]
    if rows < cache.vocab_size:
        raise LmdistillError(f"--student: the teacher cache's vocabulary has {cache.vocab_size} tokens but the student "
                             f"only {rows} output rows.")
    return student, cache, None if rows == cache.vocab_size else cache.vocab_size
