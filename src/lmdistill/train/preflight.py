"""Every check of `train`/`distill` options that needs no model, run before anything expensive or lasting.

`check(values, command)` runs before the accelerator starts, before any model loads and before any data is tokenized, so a
typo costs a second instead of a teacher load, and a failed start writes nothing. It checks each option's
combination with the others, the files and folders named (data, models, tokenizers, caches, adapters), the device,
that every tokenizer involved has one vocabulary, and what `--output_dir` already holds:

- a folder that holds an earlier run is refused unless `--resume` (continue it) or `--overwrite` (delete the old
  run's outputs when the new run starts; files that are not a run's are left alone);
- `--resume` is refused when an option that changes what is trained differs from the checkpoint's
  (`--allow_config_change` accepts it, e.g. for a new learning rate).

It returns the run's frozen plan (`lmdistill.train.plan.RunPlan`): the teacher as a spec tree of registered kinds
(their own checks run here), the batch source and objective, schedules and the output policy. Ranges of single
options (`--batch_size 0`, `--alpha 2`) are checked by their types where they are declared (`train/options.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lmdistill.errors import LmdistillError
from lmdistill.losses.engine import KDConfig
from lmdistill.models.loading import check_device, check_model_ref
from lmdistill.teachers.registry import (HIDDEN_STATES, OWN_TOKENIZATION, TeacherSpec, capabilities_of, check_teacher,
                                         kind_of, resolve_teachers, why_not)
from lmdistill.tokenizer import has_tokenizer, load_tokenizer, vocabulary_difference
from lmdistill.train import health
from lmdistill.train import state as ckpt
from lmdistill.train.batches import SOURCES, selected_source
from lmdistill.train.plan import (DataPlan, EvalPlan, FeaturePlan, GenerationPlan, LoraPlan, Objective, OutputPlan,
                                  RunPlan, Schedule, SourcePlan, StudentPlan)

# Options that never change what is trained: free to differ on --resume.
RUN_ONLY = frozenset({
    "output_dir", "resume", "overwrite", "allow_config_change", "config", "command", "device", "log_interval",
    "save_interval", "keep_checkpoints", "eval_data", "eval_interval", "eval_batches", "report_to", "use_wandb",
    "wandb_project", "num_workers", "ddp", "keep_best", "early_stopping_patience", "early_stopping_min_delta",
    "strict_health", "strict_resume", "num_proc", "data_cache",
})
MODEL_OVERRIDES = ("hidden_size", "num_layers", "use_moe")  # a preset's shape, from the command line
PATH_OPTIONS = ("data", "model", "student", "teacher", "tokenizer", "teacher_cache", "teacher_adapter")
# What a run writes into --output_dir (deleted by --overwrite; nothing else there is touched).
RUN_FILES = ("metrics.jsonl", "lmdistill_config.yaml", "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
             "feature_projectors.safetensors", "stage_done.json")
TRACKER_MODULES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "swanlab": ("swanlab",)}
RUN_GLOBS = ("checkpoint-*", ".checkpoint-*.tmp-*", ".final.tmp-*", "model-*-of-*.safetensors", "adapter", "stage-*")


def check(values: Mapping[str, Any], command: str) -> RunPlan:
    """The plan of a `train`/`distill` run from its checked options (`TrainConfig/DistillConfig.values()`), after
    every check that needs no model."""
    v, distill = dict(values), command == "distill"
    teacher, source = None, SOURCES["dataset"]
    if distill:
        teacher = resolve_teachers(v)
        if teacher is None:
            raise LmdistillError("distill needs a teacher: --teacher DIR (a model folder) or --teacher_cache DIR (made "
                                 "by `lmdistill cache-teacher`).")
        source = selected_source(v)
        source.check(v, teacher)
        _check_objective(v, teacher)
    if v["packing"] and distill and source.name != "dataset":
        raise LmdistillError(f"--packing: not combined with the {source.name.replace('_', ' ')} batch source yet "
                             "(its rows are made per example); drop --packing, or use --group_by_length.")
    check_device(v["device"])
    health_plan = health.check_options(v, command, teacher)
    _check_inputs(v, distill, teacher)
    tokenizer = _check_tokenizers(v, distill, teacher)
    if distill and v["top_k"] is not None and v["top_k"] > len(tokenizer):
        raise LmdistillError(f"--top_k: expected at most the vocabulary size ({len(tokenizer):,} tokens), found "
                             f"{v['top_k']}.")
    resume_from, stale = _check_output_dir(v, command)
    return _plan(v, command, tokenizer, teacher, source, health_plan, resume_from, stale)


def _plan(v: dict, command: str, tokenizer, teacher, source, health_plan, resume_from, stale) -> RunPlan:
    from lmdistill.models import PRESETS

    distill = command == "distill"
    ref, flag = (v["student"], "--student") if distill else (v["model"], "--model")
    overrides = tuple((k, v[k]) for k in MODEL_OVERRIDES if v[k] is not None) if ref in PRESETS else ()
    lora = None
    if v["lora_r"]:
        targets = tuple(v["lora_target_modules"].split(",")) if v["lora_target_modules"] else None
        lora = LoraPlan(v["lora_r"], v["lora_alpha"], v["lora_dropout"], targets)
    generation = None
    if distill and source.generates(v):
        generation = GenerationPlan(v["max_new_tokens"], v["generation_temperature"], v["generation_top_p"],
                                    v["generation_backend"], v["vllm_gpu_memory_utilization"])
    tracker = "wandb" if v["use_wandb"] else v["report_to"]
    return RunPlan(
        command=command, values=v, tokenizer=tokenizer,
        student=StudentPlan(ref, flag, overrides, lora, v["gradient_checkpointing"]),
        teacher=teacher,
        data=DataPlan(v["data"], v["data_format"], v["skip_bad_records"], v["max_seq_len"],
                      source.data_mode(v) if distill else "examples", v["eval_data"], num_proc=v["num_proc"],
                      cache_dir=v["data_cache"], packing=v["packing"], group_by_length=v["group_by_length"]),
        source=SourcePlan(source.name, v["on_policy_fraction"] if distill else 0.0, generation, source.settings(v)),
        objective=_objective(v, source) if distill else Objective("ce"),
        schedule=Schedule(v["max_steps"], v["epochs"], v["batch_size"], v["accumulation_steps"], v["learning_rate"],
                          v["weight_decay"], v["warmup_iters"], v["grad_clip"], v["seed"]),
        output=OutputPlan(Path(v["output_dir"]), resume_from, tuple(stale), v["save_interval"], v["keep_checkpoints"],
                          v["log_interval"], tracker, v["wandb_project"]),
        eval=EvalPlan(v["eval_interval"], v["eval_batches"]),
        health=health_plan, device=v["device"], dtype=v["dtype"],
        via=tuple(v["via"] or ()) if distill else (),
        stage_steps=tuple(v["stage_steps"]) if distill and v["stage_steps"] else None)


def _objective(v: dict, source) -> Objective:
    kd = KDConfig(divergence=v["divergence"], temperature=v["temperature"], alpha=v["alpha"],
                  skew_lambda=v["skew_lambda"], jsd_beta=v["jsd_beta"])
    feature = FeaturePlan(v["feature_loss"], v["feature_weight"], v["layer_map"]) if v["feature_loss"] else None
    return Objective(source.objective, kd, v["top_k"], v["temperature_end"], v["temperature_schedule"], feature,
                     v["cross_tokenizer"], v["lm_coef"], v["minillm_clip"], v["teacher_mix_alpha"])


# -- options that go together --------------------------------------------------------------------------------
def _check_objective(v: dict, teacher: TeacherSpec) -> None:
    """The objective's options against each other and against what the teacher can do."""
    if v["feature_loss"]:
        from lmdistill.losses.features import parse_layer_map

        reason = why_not(teacher, HIDDEN_STATES)
        if reason is not None:
            raise LmdistillError(f"--feature_loss: {reason}; use an online --teacher for feature distillation.")
        if v["method"] == "minillm":
            raise LmdistillError("--feature_loss: not combined with --method minillm (its loss is on sampled "
                                 "replies); use --method kd.")
        if v["layer_map"] != "auto":
            parse_layer_map(v["layer_map"], 10**6, 10**6)  # the syntax now; the layer ranges once the models are known
    if v["generation_backend"] == "vllm":
        from lmdistill.models.vllm_backend import check_vllm

        if v["on_policy_fraction"] == 0 and v["method"] != "minillm":
            raise LmdistillError("--generation_backend vllm: nothing is generated at --on_policy_fraction 0; set a "
                                 "fraction > 0 or drop the option.")
        check_vllm(v["device"])
    if v["temperature_end"] is None and v["temperature_schedule"] != "linear":
        raise LmdistillError(f"--temperature_schedule {v['temperature_schedule']} needs --temperature_end (the value "
                             "to anneal to); without it the temperature is constant.")


# -- files and folders ---------------------------------------------------------------------------------------
def _check_inputs(v: dict, distill: bool, teacher: TeacherSpec | None) -> None:
    from lmdistill.data import check_data_path
    from lmdistill.models import PRESETS

    check_data_path(v["data"], "--data")
    if v["eval_data"]:
        check_data_path(v["eval_data"], "--eval_data")
    model_flag, model = ("--student", v["student"]) if distill else ("--model", v["model"])
    check_model_ref(model_flag, model)
    if teacher is not None:
        check_teacher(teacher, v)
    given = [f"--{k}" for k in MODEL_OVERRIDES if v[k] is not None]
    if given and model not in PRESETS:
        raise LmdistillError(f"{', '.join(given)} only apply to a preset; {model_flag} '{model}' is a saved model, "
                             "which keeps its own architecture.")
    if v["lora_target_modules"] and not v["lora_r"]:
        raise LmdistillError("--lora_target_modules needs --lora_r R (the LoRA rank); without it the whole model "
                             "is trained.")
    tracker = "wandb" if v["use_wandb"] else v["report_to"]
    if tracker != "none":
        import importlib.util

        modules = TRACKER_MODULES[tracker]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise LmdistillError(f"--report_to {tracker}: the '{modules[0]}' package is not installed; "
                                 f"`pip install {modules[0]}` or leave --report_to at none.")


# -- tokenizers ----------------------------------------------------------------------------------------------
def _check_tokenizers(v: dict, distill: bool, teacher: TeacherSpec | None) -> Any:
    """The run's tokenizer (--tokenizer, else the teacher's / cache's / model's own) after checking that every
    tokenizer involved (--tokenizer, the teacher's, the cache's, the student folder's) has its vocabulary. A
    teacher that reads the data in its own tokenization keeps its tokenizer; the run's is then the student's."""
    sources: list[tuple[str, str]] = []  # (flag + value, tokenizer folder), in order of preference
    if v["tokenizer"]:
        sources.append((f"--tokenizer {v['tokenizer']}", v["tokenizer"]))
    own = teacher is not None and OWN_TOKENIZATION in capabilities_of(teacher)
    if own and not v["tokenizer"] and not has_tokenizer(v["student"]):
        raise LmdistillError(f"--cross_tokenizer: --student '{v['student']}' is a preset without a tokenizer; pass "
                             "--tokenizer DIR for the student (the teacher keeps its own).")
    for leaf in teacher.leaves() if teacher is not None and not own else []:
        folder = kind_of(leaf).tokenizer_dir(leaf)
        if folder is not None:
            sources.append((leaf.label, folder))
    model_flag, model = ("--student", v["student"]) if distill else ("--model", v["model"])
    if has_tokenizer(model):
        sources.append((f"{model_flag} {model}", model))
    if not sources:
        first = teacher.leaves()[0].ref if teacher is not None else "?"
        folders = f"--teacher '{first}' has" if distill else f"{model_flag} '{model}' is a preset and has"
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


# -- the run folder ------------------------------------------------------------------------------------------
def run_outputs(folder: Path) -> list[Path]:
    """What an earlier run left in `folder` (checkpoints, logs, the saved model), sorted."""
    if not folder.is_dir():
        return []
    found = {folder / name for name in RUN_FILES if (folder / name).exists()}
    found.update(p for pattern in RUN_GLOBS for p in folder.glob(pattern))
    first = ("metrics.jsonl", "checkpoint-", "model")  # what a user recognizes as a run, named first in errors
    return sorted(found, key=lambda p: (not p.name.startswith(first), p.name))


def _check_output_dir(v: dict, command: str) -> tuple[Path | None, list[Path]]:
    from lmdistill.train.lock import check_free

    out = Path(v["output_dir"])
    if out.exists() and not out.is_dir():
        raise LmdistillError(f"--output_dir: expected a folder for the run, found a file at '{out}'.")
    check_free(out)
    for flag in PATH_OPTIONS:
        for value in _as_list(v.get(flag)):
            if Path(value).exists() and Path(value).resolve() == out.resolve():
                raise LmdistillError(f"--output_dir '{out}' is also --{flag}: the run would write over its own "
                                     "input. Choose another --output_dir.")
    if v["resume"] and v["overwrite"]:
        raise LmdistillError("--resume continues the run in --output_dir and --overwrite deletes it: give one.")
    if v["resume"]:
        folder = ckpt.find_resume_checkpoint(out, v["resume"], strict=v["strict_resume"])
        if not v["allow_config_change"]:
            _check_same_config(v, folder)
        _check_same_data(v, folder)
        return folder, []
    # finished stages of a progressive run (`train/progressive.py`) are its last stage's neighbours, not a used run
    old = [p for p in run_outputs(out) if not (p.name.startswith("stage-") and (p / "stage_done.json").is_file())]
    if old and not v["overwrite"]:
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old[:6]) + (", ..." if len(old) > 6 else "")
        raise LmdistillError(f"--output_dir '{out}' holds an earlier run ({shown}). Pass --resume to continue it, "
                             "--overwrite to delete it and start anew, or choose another --output_dir.")
    return None, old


def _check_same_config(v: dict, folder: Path) -> None:
    saved = ckpt.read_config(folder)
    differ = []
    for key, value in sorted(v.items()):
        if key in RUN_ONLY or key not in saved or _same(key, saved[key], value):
            continue
        differ.append(f"--{key} {saved[key]!r} -> {value!r}")
    if differ:
        raise LmdistillError(f"--resume: checkpoint '{folder}' was trained with other options: {'; '.join(differ)}. "
                             "Resume with the same options, or pass --allow_config_change to continue with the new "
                             "ones (e.g. a new learning rate).")


def _check_same_data(v: dict, folder: Path) -> None:
    """--resume over data that changed under the run is refused (--allow_config_change: a warning)."""
    import json

    from lmdistill.data.identity import data_fingerprint, describe_change

    record = folder / ckpt.DATA_FILE
    if not record.is_file():  # a checkpoint written before data identities were recorded
        return
    old = json.loads(record.read_text())
    if not _same("data", old.get("path"), v["data"]):
        return  # another --data: the options check names it (or --allow_config_change accepted it)
    change = describe_change(old, data_fingerprint(v["data"]))
    if change is None:
        return
    what = f"--data '{v['data']}' changed since {folder.name} was written ({change})"
    if not v["allow_config_change"]:
        raise LmdistillError(f"--resume: {what}. Resuming would not continue the same run: the example order is "
                             "computed over the data. Restore the data, or pass --allow_config_change to continue "
                             "over the new data anyway.")
    print(f"warning: --resume: {what}; continuing (--allow_config_change), but the resume is not exact: from "
          f"{folder.name} on, the example order is computed over the new data (seeded by --seed and the step).")


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

