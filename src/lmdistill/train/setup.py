"""From the run plan to what the loop needs: the examples, the frozen teacher (any registered kind) and the student.

The checks that need no model run before this, in `preflight.py`; the ones here need the models (output rows
against the tokenizer; padded embedding rows ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmdistill.errors import LmdistillError
from lmdistill.teachers.registry import OWN_TOKENIZATION, BuildContext, assemble, build_leaves, capabilities_of
from lmdistill.train.plan import RunPlan, StudentPlan


@dataclass
class Setup:
    tokenizer: Any
    student: torch.nn.Module
    teacher: Any | None  # a lmdistill.teachers.Teacher (any registered kind); None for CE training
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


def build_student(spec: StudentPlan, tokenizer, device) -> torch.nn.Module:
    from lmdistill.models import apply_lora, load_model

    model = load_model(spec.ref, tokenizer=tokenizer, dtype="float32", device=device, **dict(spec.overrides))
    if spec.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    if spec.lora is not None:
        lora = spec.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=list(lora.target_modules) if lora.target_modules else None)
    return model


def load_train_examples(plan: RunPlan, teacher_tokenizer=None):
    """The training examples as the plan's data mode reads them: tokenized replies, prompts alone (every reply is
    the student's) or both tokenizations (a teacher with its own tokenizer)."""
    from lmdistill.data import load_examples, prompt_examples

    d, tokenizer = plan.data, plan.tokenizer
    if d.mode == "cross":
        from lmdistill.data.cross_tokenizer import load_cross_examples

        return load_cross_examples(d.path, tokenizer, teacher_tokenizer, d.max_seq_len, d.format, d.skip_bad_records)
    if d.mode == "prompts":
        return prompt_examples(d.path, tokenizer, d.max_seq_len, d.format)
    try:
        return load_examples(d.path, tokenizer, d.max_seq_len, d.format, d.skip_bad_records, d.num_proc, d.cache_dir)
    except LmdistillError as exc:
        if plan.objective.name == "minillm" and "without any assistant turn" in str(exc):
            raise LmdistillError(f"{exc} --method minillm trains CE on the dataset's replies (--lm_coef "
                                 f"{plan.objective.lm_coef:g}); for prompts-only data pass --lm_coef 0.") from None
        raise


def load_data(plan: RunPlan, is_main: bool, teacher_tokenizer=None):
    """(train examples, eval examples or None), with a summary of each on the main process."""
    from lmdistill.data import load_examples

    d = plan.data
    examples = load_train_examples(plan, teacher_tokenizer)
    if is_main and d.mode == "prompts":
        print(f"train data: {d.path}: {len(examples):,} prompts (fully on-policy: the student writes every reply)")
    elif is_main:
        print(f"train data: {examples.stats.summary()}")
    eval_examples = None
    if d.eval_path:
        eval_examples = load_examples(d.eval_path, plan.tokenizer, d.max_seq_len, d.format, d.skip_bad_records,
                                      d.num_proc, d.cache_dir)
    if is_main and eval_examples is not None:
        print(f"eval data: {eval_examples.stats.summary()}")
    return examples, eval_examples


def teacher_tokenizer_of(plan: RunPlan):
    """The teacher's own tokenizer when it reads the data in its own tokenization, else None."""
    if plan.teacher is None or OWN_TOKENIZATION not in capabilities_of(plan.teacher):
        return None
    from lmdistill.tokenizer import load_tokenizer

    leaf = plan.teacher.leaves()[0]
    return load_tokenizer(leaf.ref, leaf.flag)


def build(plan: RunPlan, device, is_main: bool) -> Setup:
    """Everything the loop needs, from a checked plan: the data first (a bad record stops the run before any model
    loads), then the teachers (one after the other, each in its own dtype), the student, the vocabulary they
    compare, and the teacher assembled from its parts."""
    tokenizer, teacher = plan.tokenizer, None
    teacher_tokenizer = teacher_tokenizer_of(plan)
    examples, eval_examples = load_data(plan, is_main, teacher_tokenizer)
    if plan.teacher is None:
        student = build_student(plan.student, tokenizer, device)
    else:
        leaves_spec = plan.teacher.leaves()
        ctx = BuildContext(tokenizer, device, is_main, several=len(leaves_spec) > 1, loss_top_k=plan.objective.loss_top_k,
                           extra={"teacher_tokenizer": teacher_tokenizer})
        leaves = build_leaves(plan.teacher, ctx)
        student = build_student(plan.student, tokenizer, device)
        _set_vocabulary(tokenizer, student, leaves, teacher_tokenizer)
        teacher = assemble(plan.teacher, ctx, list(leaves))
        teacher.check_examples(examples)
    if plan.data.packing:
        _check_packable([("--student", student)] + [(leaf.name, leaf.model) for leaf in
                                                    (teacher.members() if teacher is not None else [])
                                                    if getattr(leaf, "model", None) is not None])
    if plan.objective.feature is not None:
        attach_projectors(plan, student, teacher, is_main)
    return Setup(tokenizer, student, teacher, examples, eval_examples)


def _check_packable(models: list) -> None:
    from lmdistill.models.hidden import packing_blocker

    for name, model in models:
        blocker = packing_blocker(model)
        if blocker is not None:
            raise LmdistillError(f"--packing: {name} is {blocker}, which cannot keep packed examples apart; drop "
                                 "--packing and use --group_by_length (length-grouped batches need nothing of the "
                                 "model).")


def _set_vocabulary(tokenizer, student, leaves: list, teacher_tokenizer) -> None:
    """Check every model's output rows against its tokenizer and give each teacher the number of logits compared."""
    if teacher_tokenizer is not None:  # its own vocabulary: each model against its own tokenizer
        compared_vocabulary(teacher_tokenizer, leaves[0].model, [])
        compared_vocabulary(tokenizer, student, [])
        return
    models = [t for t in leaves if t.rows is not None]
    if models:
        vocab = compared_vocabulary(tokenizer, student, [t.vocab_size if t.rows is None else t.rows for t in leaves])
        for t in models:
            t.vocab_size = vocab
        return
    rows, vocab = student.get_output_embeddings().weight.shape[0], leaves[0].vocab_size
    if rows < vocab or any(t.vocab_size != vocab for t in leaves):
        raise LmdistillError(f"--student: the teacher cache's vocabulary has {vocab} tokens but the student only {rows} "
                             "output rows." if rows < vocab else "the teacher caches hold different vocabularies.")


def attach_projectors(plan: RunPlan, student, teacher, is_main: bool) -> None:
    """Feature distillation: the layer pairs of --layer_map, their projectors attached to the student (so the
    optimizer, DDP and checkpoints carry them), and the teacher told which of its layers to keep."""
    from lmdistill.losses.features import FeatureProjectors, parse_layer_map
    from lmdistill.models.hidden import decoder_layers, unwrap
    from lmdistill.train.state import PROJECTORS_ATTR

    feature = plan.objective.feature
    width = lambda m: unwrap(m).config.get_text_config().hidden_size  # noqa: E731
    pairs = parse_layer_map(feature.layer_map, len(decoder_layers(student)), len(decoder_layers(teacher.model)))
    projectors = FeatureProjectors(pairs, width(student), width(teacher.model))
    student.add_module(PROJECTORS_ATTR, projectors.to(next(student.parameters()).device))
    teacher.keep_layers = projectors.teacher_layers
    if is_main:
        print(f"feature distillation ({feature.loss}, weight {feature.weight:g}): student:teacher layers "
              f"{', '.join(f'{s}:{t}' for s, t in pairs)}; {sum(p.numel() for p in projectors.parameters()):,} "
              "projector parameters")
