"""From command-line options to what the loop needs: tokenizer, student, frozen teacher, examples.

Checks that are cheap and fail early live here, before any model runs: required options, and whether the
teacher and student can be compared token by token (same tokenizer; padded embedding rows ignored).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
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


def require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            raise LmdistillError(f"--{name} is required (on the command line or as '{name}:' in the --config recipe).")


def load_tokenizer(path: str | None, what: str):
    from transformers import AutoTokenizer

    if path is None or not Path(path).is_dir():
        raise LmdistillError(f"{what}: expected a tokenizer folder (tokenizer.json / tokenizer_config.json), found "
                             f"{'nothing' if path is None else repr(path)}. Pass --tokenizer DIR (e.g. one made by "
                             "`lmdistill tokenizer`).")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _has_tokenizer(path: str | None) -> bool:
    return path is not None and Path(path).is_dir() and any(
        (Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def check_tokenizers(student_tok, teacher_tok) -> None:
    """Token-level distillation needs one vocabulary: different tokenizers are an error before any model loads."""
    if teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise LmdistillError(
            f"the student's tokenizer ({len(student_tok)} tokens) differs from the teacher's ({len(teacher_tok)} "
            "tokens): token-level distillation needs one vocabulary. Drop --tokenizer so the student uses the "
            "teacher's tokenizer, or build the student from a preset with the teacher's tokenizer."
        )


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


def build(args: argparse.Namespace, device, is_main: bool) -> Setup:
    """Everything the loop needs, from the options of `train` or `distill`."""
    from lmdistill.data import load_examples
    from lmdistill.models import load_teacher

    distill = args.command == "distill"
    cached = distill and bool(getattr(args, "teacher_cache", None))
    if cached and args.teacher:
        raise LmdistillError("give --teacher (an online teacher) or --teacher_cache (a cache made by `lmdistill "
                             "cache-teacher`), not both.")
    require(args, "data", "output_dir", *(("student",) if cached else ("teacher", "student") if distill else ("model",)))
    teacher = teacher_tok = cache = None
    if cached:
        tokenizer, student, cache, vocab = _cached_teacher_setup(args, device)
    elif distill:
        teacher_tok = load_tokenizer(args.teacher, "--teacher") if _has_tokenizer(args.teacher) else None
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer else teacher_tok
        if tokenizer is None:
            raise LmdistillError(f"--teacher '{args.teacher}' has no tokenizer files; pass --tokenizer DIR.")
        check_tokenizers(tokenizer, teacher_tok)
        teacher = load_teacher(args.teacher, adapter=args.teacher_adapter, dtype=teacher_dtype(args), device=device,
                               tokenizer=tokenizer, verbose=is_main)
        student = build_student(args, args.student, tokenizer, device)
        vocab = check_vocabularies(tokenizer, student, teacher)
    else:
        tok_path = args.tokenizer or (args.model if _has_tokenizer(args.model) else None)
        tokenizer = load_tokenizer(tok_path, "--tokenizer")
        student, vocab = build_student(args, args.model, tokenizer, device), None
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


def _cached_teacher_setup(args, device):
    """Tokenizer, student, cache and compared vocabulary for `distill --teacher_cache DIR`; the option checks a
    cache implies run here, before any compute."""
    from lmdistill.losses.divergences import NEEDS_TAIL_BUCKET, canonical_divergence
    from lmdistill.teachers import TeacherCache

    cache = TeacherCache(args.teacher_cache)
    if args.teacher_adapter:
        raise LmdistillError("--teacher_adapter: the teacher cache already holds the (adapted) teacher's outputs; "
                             "pass the adapter to `lmdistill cache-teacher` instead.")
    if args.top_k is not None and args.top_k > cache.k:
        raise LmdistillError(f"--top_k: the teacher cache '{cache.folder}' holds the top {cache.k} tokens per "
                             f"position; expected --top_k <= {cache.k}, found {args.top_k}.")
    temperatures = {args.temperature, args.temperature if args.temperature_end is None else args.temperature_end}
    if (canonical_divergence(args.divergence) in NEEDS_TAIL_BUCKET and temperatures != {1.0}
            and (args.top_k or cache.k) < cache.vocab_size):
        raise LmdistillError(f"--divergence {args.divergence} with --teacher_cache needs --temperature 1 and no "
                             f"--temperature_end (found {args.temperature} -> {args.temperature_end}): the cache "
                             "knows the teacher's remaining mass only at T=1.")
    cache_tok = load_tokenizer(str(cache.tokenizer_dir()), "--teacher_cache")
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer else cache_tok
    check_tokenizers(tokenizer, cache_tok)
    student = build_student(args, args.student, tokenizer, device)
    rows = student.get_output_embeddings().weight.shape[0]
    if rows < cache.vocab_size:
        raise LmdistillError(f"--student: the teacher cache's vocabulary has {cache.vocab_size} tokens but the student "
                             f"only {rows} output rows.")
    return tokenizer, student, cache, None if rows == cache.vocab_size else cache.vocab_size
