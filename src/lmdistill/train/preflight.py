"""Every check of `train`/`distill` options that needs no model, run before anything expensive or lasting.

`check(args)` runs before the accelerator starts, before any model loads and before any data is tokenized, so a
typo costs a second instead of a teacher load, and a failed start writes nothing. It checks each option's
combination with the others, the files and folders named (data, models, tokenizers, caches, adapters), the device,
that every tokenizer involved has one vocabulary, and what `--output_dir` already holds:

- a folder that holds an earlier run is refused unless `--resume` (continue it) or `--overwrite` (delete the old
  run's outputs when the new run starts; files that are not a run's are left alone);
- `--resume` is refused when an option that changes what is trained differs from the checkpoint's
  (`--allow_config_change` accepts it, e.g. for a new learning rate).

Ranges of single options (`--batch_size 0`, `--alpha 2`) are checked by their types in `train/cli.py`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.errors import LmdistillError
from lmdistill.models.loading import check_device, check_model_ref
from lmdistill.tokenizer import has_tokenizer, load_tokenizer, vocabulary_difference
from lmdistill.train import health
from lmdistill.train import state as ckpt

# Options that never change what is trained: free to differ on --resume.
RUN_ONLY = frozenset({
    "output_dir", "resume", "overwrite", "allow_config_change", "config", "command", "device", "log_interval",
    "save_interval", "keep_checkpoints", "eval_data", "eval_interval", "eval_batches", "report_to", "use_wandb",
    "wandb_project", "num_workers", "ddp", "keep_best", "early_stopping_patience", "early_stopping_min_delta",
    "strict_health",
})
PATH_OPTIONS = ("data", "model", "student", "teacher", "tokenizer", "teacher_cache", "teacher_adapter")
# What a run writes into --output_dir (deleted by --overwrite; nothing else there is touched).
RUN_FILES = ("metrics.jsonl", "lmdistill_config.yaml", "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
             "feature_projectors.safetensors", "stage_done.json")
TRACKER_MODULES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "swanlab": ("swanlab",)}
RUN_GLOBS = ("checkpoint-*", ".checkpoint-*.tmp-*", ".final.tmp-*", "model-*-of-*.safetensors", "adapter", "stage-*")


@dataclass
class Plan:
    """What the checks resolved: the tokenizer the run uses, the checkpoint to resume, old outputs to delete."""

    tokenizer: Any
    resume_from: Path | None = None
    stale_outputs: list[Path] = field(default_factory=list)


def check(args: argparse.Namespace) -> Plan:
    distill = args.command == "distill"
    if distill:
        _check_teacher_options(args)
    check_device(args.device)
    health.check_options(args)
    _check_inputs(args, distill)
    tokenizer = _check_tokenizers(args, distill)
    _check_vocab_options(args, tokenizer, distill)
    resume_from, stale = _check_output_dir(args)
    return Plan(tokenizer, resume_from, stale)


# -- options that go together --------------------------------------------------------------------------------
def _check_teacher_options(args) -> None:
    teachers, caches, adapters = args.teacher or [], args.teacher_cache or [], args.teacher_adapter or []
    if not teachers and not caches:
        raise LmdistillError("distill needs a teacher: --teacher DIR (a model folder) or --teacher_cache DIR (made "
                             "by `lmdistill cache-teacher`).")
    if adapters and len(adapters) != len(teachers):
        raise LmdistillError(f"--teacher_adapter: expected one per --teacher ({len(teachers)}, in the same order), "
                             f"found {len(adapters)}. A teacher cache already holds its (adapted) teacher's outputs: "
                             "pass the adapter to `lmdistill cache-teacher` instead.")
    dtypes = args.teacher_dtype or []
    if len(dtypes) > 1 and len(dtypes) != len(teachers):
        raise LmdistillError(f"--teacher_dtype: expected one (for every teacher) or one per --teacher "
                             f"({len(teachers)}, in the same order), found {len(dtypes)}.")
    n = len(teachers) + len(caches)
    if args.teacher_weights is not None and len(args.teacher_weights) != n:
        raise LmdistillError(f"--teacher_weights: expected {n} weights (one per teacher: --teacher ones first, then "
                             f"--teacher_cache ones), found {len(args.teacher_weights)}.")
    repeated = sorted({t for t in teachers + caches if (teachers + caches).count(t) > 1})
    if repeated:
        raise LmdistillError(f"teacher '{repeated[0]}' is given more than once; give each teacher once and weight it "
                             "with --teacher_weights.")
    if caches and args.on_policy_fraction > 0:
        raise LmdistillError("--on_policy_fraction: a teacher cache holds scores of the dataset's replies only and "
                             "cannot score replies the student writes; use an online --teacher for on-policy "
                             "distillation (or --on_policy_fraction 0).")
    if args.cross_tokenizer:
        _check_cross_options(args, teachers, caches)
    if args.feature_loss:
        _check_feature_options(args, teachers, caches)
    if getattr(args, "method", "kd") == "minillm":
        _check_minillm_options(args, caches)
    if args.generation_backend == "vllm":
        from lmdistill.models.vllm_backend import check_vllm

        if args.method == "minillm":
            raise LmdistillError("--generation_backend vllm: MiniLLM samples from the teacher-student mixture token by "
                                 "token, which vLLM cannot; use --generation_backend auto.")
        if args.on_policy_fraction == 0:
            raise LmdistillError("--generation_backend vllm: nothing is generated at --on_policy_fraction 0; set a "
                                 "fraction > 0 or drop the option.")
        check_vllm(args.device)
    if args.temperature_end is None and args.temperature_schedule != "linear":
        raise LmdistillError(f"--temperature_schedule {args.temperature_schedule} needs --temperature_end (the value "
                             "to anneal to); without it the temperature is constant.")


def _check_cross_options(args, teachers: list, caches: list) -> None:
    flag = f"--cross_tokenizer {args.cross_tokenizer}"
    if caches or len(teachers) != 1:
        raise LmdistillError(f"{flag}: distills from one online --teacher (a teacher cache holds no alignment to the "
                             "student's tokens; ensembles are not combined across tokenizers).")
    conflicts = [
        (args.method != "kd", "--method minillm"),
        (args.on_policy_fraction > 0, "--on_policy_fraction"),
        (bool(args.feature_loss), "--feature_loss"),
        (bool(args.via), "--via"),
    ]
    for bad, what in conflicts:
        if bad:
            raise LmdistillError(f"{flag}: not combined with {what} yet.")


def _check_feature_options(args, teachers: list, caches: list) -> None:
    from lmdistill.losses.features import parse_layer_map

    if caches:
        raise LmdistillError("--feature_loss: a teacher cache holds no hidden states (only its top-k logits); use an "
                             "online --teacher for feature distillation.")
    if len(teachers) > 1:
        raise LmdistillError("--feature_loss: the hidden states of which teacher? Feature distillation takes one "
                             "--teacher (ensembles distill logits only).")
    if args.method == "minillm":
        raise LmdistillError("--feature_loss: not combined with --method minillm (its loss is on sampled replies); "
                             "use --method kd.")
    if args.layer_map != "auto":
        parse_layer_map(args.layer_map, 10**6, 10**6)  # the syntax now; the layer ranges once the models are known


def _check_minillm_options(args, caches: list) -> None:
    """MiniLLM's objective is fixed (sequence-level reverse KL at T = 1, sampled from the teacher-student mixture
    every step): options of the token-level objective that would change it are refused, not ignored."""
    from lmdistill.losses.divergences import canonical_divergence

    if caches:
        raise LmdistillError("--method minillm: a teacher cache cannot score the replies the student samples; use an "
                             "online --teacher.")
    conflicts = [
        (args.on_policy_fraction > 0, f"--on_policy_fraction {args.on_policy_fraction:g}",
         "MiniLLM samples replies on every step"),
        (canonical_divergence(args.divergence) not in ("forward_kl", "reverse_kl"), f"--divergence {args.divergence}",
         "MiniLLM minimizes the reverse KL"),
        (args.temperature != 1.0 or args.temperature_end is not None, "--temperature/--temperature_end",
         "MiniLLM's reverse KL is at temperature 1"),
        (args.alpha != 0, f"--alpha {args.alpha:g}", "the CE on the dataset replies is --lm_coef"),
        (args.top_k is not None, f"--top_k {args.top_k}", "the single-step reverse KL is exact over the vocabulary"),
        (args.generation_temperature != 1.0 or args.generation_top_p != 1.0,
         "--generation_temperature/--generation_top_p",
         "MiniLLM samples from the teacher-student mixture at temperature 1 (its importance weights assume it)"),
    ]
    for bad, flag, why in conflicts:
        if bad:
            raise LmdistillError(f"{flag}: not used by --method minillm ({why}); drop it, or use --method kd.")


# -- files and folders ---------------------------------------------------------------------------------------
def _check_inputs(args, distill: bool) -> None:
    from lmdistill.data import check_data_path
    from lmdistill.models import PRESETS

    check_data_path(args.data, "--data")
    if args.eval_data:
        check_data_path(args.eval_data, "--eval_data")
    model_flag, model = ("--student", args.student) if distill else ("--model", args.model)
    check_model_ref(model_flag, model)
    for teacher in (args.teacher or []) if distill else []:
        check_model_ref("--teacher", teacher)
    for adapter in (args.teacher_adapter or []) if distill else []:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise LmdistillError(f"--teacher_adapter: expected a LoRA adapter folder (adapter_config.json), found "
                                 f"{'no such folder' if not Path(adapter).is_dir() else 'none'} at '{adapter}'.")
    for cache in (args.teacher_cache or []) if distill else []:
        _cache_meta(cache)
    given = [f"--{k}" for k in ("hidden_size", "num_layers", "use_moe") if getattr(args, k) is not None]
    if given and model not in PRESETS:
        raise LmdistillError(f"{', '.join(given)} only apply to a preset; {model_flag} '{model}' is a saved model, "
                             "which keeps its own architecture.")
    if args.lora_target_modules and not args.lora_r:
        raise LmdistillError("--lora_target_modules needs --lora_r R (the LoRA rank); without it the whole model "
                             "is trained.")
    tracker = "wandb" if args.use_wandb else args.report_to
    if tracker != "none":
        import importlib.util

        modules = TRACKER_MODULES[tracker]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise LmdistillError(f"--report_to {tracker}: the '{modules[0]}' package is not installed; "
                                 f"`pip install {modules[0]}` or leave --report_to at none.")


def _cache_meta(folder: str) -> dict:
    from lmdistill.teachers.cache import read_meta

    return read_meta(folder)


# -- tokenizers ----------------------------------------------------------------------------------------------
def _check_tokenizers(args, distill: bool) -> Any:
    """The run's tokenizer (--tokenizer, else the teacher's / cache's / model's own) after checking that every
    tokenizer involved (--tokenizer, the teacher's, the cache's, the student folder's) has its vocabulary."""
    sources: list[tuple[str, str]] = []  # (flag + value, tokenizer folder), in order of preference
    if args.tokenizer:
        sources.append((f"--tokenizer {args.tokenizer}", args.tokenizer))
    cross = distill and getattr(args, "cross_tokenizer", None)
    if cross:  # the teacher keeps its own tokenizer; the run's is the student's
        teacher = args.teacher[0]
        if not has_tokenizer(teacher):
            raise LmdistillError(f"--cross_tokenizer: --teacher '{teacher}' has no tokenizer files; the teacher reads "
                                 "the data with its own tokenizer and chat template.")
        load_tokenizer(teacher, "--teacher")
        if not args.tokenizer and not has_tokenizer(args.student):
            raise LmdistillError(f"--cross_tokenizer: --student '{args.student}' is a preset without a tokenizer; pass "
                                 "--tokenizer DIR for the student (the teacher keeps its own).")
    for teacher in (args.teacher or []) if distill and not cross else []:
        if has_tokenizer(teacher):
            sources.append((f"--teacher {teacher}", teacher))
    for cache in (args.teacher_cache or []) if distill else []:
        sources.append((f"--teacher_cache {cache}", str(Path(cache) / "tokenizer")))
    model_flag, model = ("--student", args.student) if distill else ("--model", args.model)
    if has_tokenizer(model):
        sources.append((f"{model_flag} {model}", model))
    if not sources:
        folders = f"--teacher '{(args.teacher or ['?'])[0]}' has" if distill else f"{model_flag} '{model}' is a preset and has"
        raise LmdistillError(f"no tokenizer: {folders} no tokenizer files (tokenizer.json); pass --tokenizer DIR "
                             "(e.g. one made by `lmdistill tokenizer`).")
    loaded = [(name, load_tokenizer(path, name.split()[0])) for name, path in sources]
    (first_name, first), others = loaded[0], loaded[1:]
    for name, tok in others:
        diff = vocabulary_difference(first, tok)
        if diff is not None:
            raise LmdistillError(_mismatch_message(first_name, name, diff, distill))
    return first


def _mismatch_message(a: str, b: str, diff: str, distill: bool) -> str:
    what = ("token-level distillation compares the two models' distributions id by id, so the teacher, the student "
            "and the data must share one vocabulary" if distill else "the model must be trained with its own "
            "vocabulary")
    fix = ("Distill into a student of the teacher's family (same tokenizer), build the student from a preset "
           "(e.g. --student nano), which takes the teacher's tokenizer, or distill across tokenizers with "
           "--cross_tokenizer uld|gold." if distill else
           "Drop --tokenizer to use the model folder's own tokenizer, or start from a preset.")
    return f"the tokenizers of {a} and {b} disagree ({diff}): {what}. {fix}"


def _check_vocab_options(args, tokenizer, distill: bool) -> None:
    if not distill:
        return
    vocab = len(tokenizer)
    if args.top_k is not None and args.top_k > vocab:
        raise LmdistillError(f"--top_k: expected at most the vocabulary size ({vocab:,} tokens), found {args.top_k}.")
    if not args.teacher_cache:
        return
    from lmdistill.losses.divergences import NEEDS_TAIL_BUCKET, canonical_divergence

    for cache in args.teacher_cache:
        meta = _cache_meta(cache)
        k, full = int(meta["top_k"]), int(meta["top_k"]) >= int(meta["vocab_size"])
        if args.top_k is not None and args.top_k > k:
            raise LmdistillError(f"--top_k: the teacher cache '{cache}' holds the top {k} tokens per position; "
                                 f"expected --top_k <= {k}, found {args.top_k}.")
        if not full and len(args.teacher or []) + len(args.teacher_cache) > 1:
            raise LmdistillError(f"--teacher_cache '{cache}' holds only the top {k} of {int(meta['vocab_size']):,} "
                                 "tokens per position: an ensemble needs every logit of each member (the ids a cache "
                                 "did not keep have none). Cache the whole vocabulary (`cache-teacher --top_k "
                                 f"{int(meta['vocab_size'])}`) or use online teachers.")
        temperatures = {args.temperature, args.temperature if args.temperature_end is None else args.temperature_end}
        if (canonical_divergence(args.divergence) in NEEDS_TAIL_BUCKET and temperatures != {1.0}
                and (args.top_k or k) < int(meta["vocab_size"])):
            raise LmdistillError(f"--divergence {args.divergence} with --teacher_cache needs --temperature 1 and no "
                                 f"--temperature_end (found {args.temperature} -> {args.temperature_end}): the cache "
                                 "knows the teacher's remaining mass only at T=1.")


# -- the run folder ------------------------------------------------------------------------------------------
def run_outputs(folder: Path) -> list[Path]:
    """What an earlier run left in `folder` (checkpoints, logs, the saved model), sorted."""
    if not folder.is_dir():
        return []
    found = {folder / name for name in RUN_FILES if (folder / name).exists()}
    found.update(p for pattern in RUN_GLOBS for p in folder.glob(pattern))
    first = ("metrics.jsonl", "checkpoint-", "model")  # what a user recognizes as a run, named first in errors
    return sorted(found, key=lambda p: (not p.name.startswith(first), p.name))


def _check_output_dir(args) -> tuple[Path | None, list[Path]]:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise LmdistillError(f"--output_dir: expected a folder for the run, found a file at '{out}'.")
    for flag in PATH_OPTIONS:
        for value in _as_list(getattr(args, flag, None)):
            if Path(value).exists() and Path(value).resolve() == out.resolve():
                raise LmdistillError(f"--output_dir '{out}' is also --{flag}: the run would write over its own "
                                     "input. Choose another --output_dir.")
    if args.resume and args.overwrite:
        raise LmdistillError("--resume continues the run in --output_dir and --overwrite deletes it: give one.")
    if args.resume:
        folder = ckpt.find_resume_checkpoint(out, args.resume)
        if not args.allow_config_change:
            _check_same_config(args, folder)
        return folder, []
    # finished stages of a progressive run (`train/progressive.py`) are its last stage's neighbours, not a used run
    old = [p for p in run_outputs(out) if not (p.name.startswith("stage-") and (p / "stage_done.json").is_file())]
    if old and not args.overwrite:
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old[:6]) + (", ..." if len(old) > 6 else "")
        raise LmdistillError(f"--output_dir '{out}' holds an earlier run ({shown}). Pass --resume to continue it, "
                             "--overwrite to delete it and start anew, or choose another --output_dir.")
    return None, old


def _check_same_config(args, folder: Path) -> None:
    saved = ckpt.read_config(folder)
    differ = []
    for key, value in sorted(vars(args).items()):
        if key in RUN_ONLY or key not in saved or _same(key, saved[key], value):
            continue
        differ.append(f"--{key} {saved[key]!r} -> {value!r}")
    if differ:
        raise LmdistillError(f"--resume: checkpoint '{folder}' was trained with other options: {'; '.join(differ)}. "
                             "Resume with the same options, or pass --allow_config_change to continue with the new "
                             "ones (e.g. a new learning rate).")


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in PATH_OPTIONS:  # one path or a list of them (--teacher is repeatable; older runs saved one string)
        old, new = _as_list(old), _as_list(new)
        return len(old) == len(new) and all(Path(a).resolve() == Path(b).resolve() for a, b in zip(old, new))
    return False


def remove_outputs(paths: list[Path]) -> None:
    """--overwrite: delete an earlier run's outputs (only what `run_outputs` found)."""
    import shutil

    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

