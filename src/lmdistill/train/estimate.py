"""`--dry_run`: what a `train`/`distill` run will need, from its plan alone, before any weight loads.

    lmdistill distill --teacher /ckpt/Qwen3-4B --student /ckpt/Qwen3-0.6B --data train.jsonl --output_dir runs/kd \
        --batch_size 4 --max_seq_len 2048 --dtype bfloat16 --dry_run

After the option checks (`preflight.check`, the same plan a real run gets), the models are built on the meta device
from their configs (`lmdistill.models.shapes`: a folder's config.json through AutoConfig; no weights file is
opened; each teacher kind gives its own shape), LoRA is applied there, and the data is tokenized (light; it gives
the number of examples, hence the steps). The bytes are a pure function of those shapes and the plan
(`lmdistill.train.memory`, where the formulas are documented); `lmdistill.train.memory_table` prints them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

from lmdistill.models.shapes import ModelShape, TeacherShape, meta_model, model_shape
from lmdistill.train.memory import Estimate, RunShape, estimate
from lmdistill.train.memory_table import format_estimate, size_text
from lmdistill.train.plan import RunPlan


def _student(plan: RunPlan):
    from lmdistill.models import apply_lora

    s = plan.student
    model = meta_model(s.ref, s.flag, plan.tokenizer, dict(s.overrides))
    if s.lora is not None:
        model = apply_lora(model, r=s.lora.r, alpha=s.lora.alpha, dropout=s.lora.dropout,
                           target_modules=list(s.lora.target_modules) if s.lora.target_modules else None)
    return model


def shapes(plan: RunPlan) -> tuple[ModelShape, list[TeacherShape], int]:
    """(student, teachers, extra trainable parameters) of the run, from configs on the meta device (each teacher
    kind's own `shape`); the vocabulary checks of the real run (`setup.compared_vocabulary`) apply."""
    from lmdistill.teachers.registry import OWN_TOKENIZATION, BuildContext, capabilities_of, teacher_shapes
    from lmdistill.train.setup import compared_vocabulary

    student_model = _student(plan)
    student = model_shape(student_model, plan.student.ref)
    if plan.teacher is None:
        compared_vocabulary(plan.tokenizer, student_model, [])
        return student, [], 0
    ctx = BuildContext(plan.tokenizer, "meta", loss_top_k=plan.objective.loss_top_k)
    teachers = teacher_shapes(plan.teacher, ctx)
    if OWN_TOKENIZATION not in capabilities_of(plan.teacher):
        compared_vocabulary(plan.tokenizer, student_model, [t.model.vocab for t in teachers if t.model])
    extra, feature = 0, plan.objective.feature
    if feature is not None:
        from lmdistill.losses.features import parse_layer_map

        t = teachers[0].model
        pairs = parse_layer_map(feature.layer_map, student.layers, t.layers)
        extra = len(pairs) * student.hidden * t.hidden
        teachers[0] = replace(teachers[0], kept_layers=len({p[1] for p in pairs}))
    return student, teachers, extra


def generates(plan: RunPlan) -> bool:
    """Whether the run's student writes replies (on-policy steps or MiniLLM's sampling)."""
    return plan.source.generation is not None


def longest_prompt(examples) -> int:
    """The longest prompt an on-policy step completes: the tokens before an example's last trained span
    (`on_policy.last_prompt`); 0 when no example has one (plain text stays off-policy)."""
    from lmdistill.train.on_policy import last_prompt

    return max((len(last_prompt(ex)) for ex in examples), default=0)


def vllm_reserved_bytes(plan: RunPlan, device: str) -> int:
    """`--generation_backend vllm`: what vLLM takes of the device (its utilization share of the total memory)."""
    gen = plan.source.generation
    if gen is None or gen.backend != "vllm" or not device.startswith("cuda"):
        return 0
    total = torch.cuda.mem_get_info(torch.device(device))[1]
    return int(gen.vllm_gpu_memory_utilization * total)


def run_shape(plan: RunPlan, extra_trainable: int = 0, prompt_tokens: int = 0, longest_example: int = 0) -> RunShape:
    """What the estimate reads of the plan; world size and strategy from torchrun/accelerate's environment.
    `prompt_tokens`: the data's longest prompt (`longest_prompt`), for a run that generates; `longest_example`:
    the longest tokenized example (0: unknown)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = plan.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    on = lambda var: os.environ.get(var, "").lower() in ("true", "1")  # noqa: E731
    strategy = "single" if world == 1 else "zero2" if on("ACCELERATE_USE_DEEPSPEED") else (
        "fsdp" if on("ACCELERATE_USE_FSDP") and device != "cpu" else "ddp")  # accelerate runs FSDP as DDP on CPU
    gen = generates(plan) and prompt_tokens > 0
    s = plan.schedule
    return RunShape(plan.command, s.batch_size, plan.data.max_seq_len, s.accumulation_steps, world, strategy,
                    plan.dtype, plan.student.gradient_checkpointing, device, s.max_steps, s.epochs, extra_trainable,
                    reply_tokens=plan.source.generation.max_new_tokens if gen else 0,
                    prompt_tokens=prompt_tokens if gen else 0, teacher_kv=gen and plan.objective.name == "minillm",
                    vllm_bytes=vllm_reserved_bytes(plan, device) if gen else 0, longest_example=longest_example,
                    all_on_policy=gen and plan.data.mode == "prompts")


def data_bytes(examples) -> int:
    """What the tokenized examples take in the process: for the memory-mapped store (`lmdistill.data.store`) its
    per-example arrays (row index and lengths; the tokens stay in the page cache); for examples in memory, what
    Python holds (sys.getsizeof of dicts, lists and int objects)."""
    if hasattr(examples, "lengths") and hasattr(examples, "index"):
        return int(examples.index.nbytes + examples.lengths.nbytes)
    total = 0
    for ex in examples:
        total += sys.getsizeof(ex)
        seen: set[int] = set()
        for value in ex.values():
            if isinstance(value, list):
                total += sys.getsizeof(value)
                for x in value:
                    if type(x) is int and not -5 <= x <= 256 and id(x) not in seen:  # small ints are shared
                        seen.add(id(x))
                        total += sys.getsizeof(x)
    return total


def visible_memory(device: str) -> tuple[int, str]:
    """What the device has free now: CUDA's free memory (after this process's context), or available RAM."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free, f"{size_text(free)} free of {size_text(total)} ({torch.cuda.get_device_name(torch.device(device))})"
    import psutil

    ram = psutil.virtual_memory()
    return ram.available, f"{size_text(ram.available)} RAM available of {size_text(ram.total)}"


# -- the dry run ---------------------------------------------------------------------------------------------
def build_estimate(plan: RunPlan, examples) -> Estimate:
    """The run's estimate from its plan and the tokenized examples; no weight loads."""
    student, teachers, extra = shapes(plan)
    lengths = getattr(examples, "lengths", None)
    longest = int(lengths.max(initial=0)) if lengths is not None else max(
        (len(ex.get("input_ids", ())) for ex in examples), default=0)
    if plan.data.packing:  # packed rows fill up to --max_seq_len whatever the examples' lengths
        longest = plan.data.max_seq_len
    run = run_shape(plan, extra, longest_prompt(examples) if generates(plan) else 0, longest)
    visible, visible_what = visible_memory(run.device)
    est = estimate(run, student, teachers, len(examples), data_bytes(examples) if run.device == "cpu" else 0, visible)
    est.visible, est.visible_what = visible, visible_what
    stats = getattr(examples, "stats", None)
    est.data = stats.summary() if stats is not None else f"{plan.data.path}: {len(examples):,} examples"
    if generates(plan) and not run.reply_tokens:
        est.notes.append("on-policy steps generate nothing here: no example has a prompt (plain text stays as it is)")
    elif run.vllm_bytes:
        est.notes.append("generation: vLLM's reserved share is counted; its KV cache and weights' copy live in it")
    if plan.objective.name == "cross_tokenizer":
        est.notes.append("--cross_tokenizer: counted as the same-tokenizer fused loss (alignment buffers not counted)")
    if any("moe" in m.model_type for m in [student] + [t.model for t in teachers if t.model]):
        est.notes.append("MoE activations approximated: top_k x expert width per token")
    return est


def stage_plans(plan: RunPlan, values, stages: list[dict]) -> list[RunPlan]:
    """One plan per progressive stage (`--via`), from the first stage's checked plan: each stage's teacher is the
    model the stage before it trains (not on disk yet, so only its config is read), its own student and steps."""
    from lmdistill.models import PRESETS
    from lmdistill.teachers.registry import TeacherSpec
    from lmdistill.train.preflight import MODEL_OVERRIDES

    plans, teacher = [plan], stages[0]["student"]
    for stage in stages[1:]:
        ref = stage["student"]
        given = stage["final"] and ref in PRESETS  # the size overrides are the final student's
        overrides = tuple((k, values[k]) for k in MODEL_OVERRIDES if given and values[k] is not None)
        student = replace(plan.student, ref=ref, overrides=overrides)
        dtype = "bfloat16" if plan.dtype == "bfloat16" else "float32"
        plans.append(replace(plan, teacher=TeacherSpec("online", teacher, "--teacher", None, dtype),
                             student=student, schedule=replace(plan.schedule, max_steps=stage["max_steps"])))
        teacher = stage["student"]
    return plans


def dry_run(values, command: str) -> int:
    """`--dry_run`: the option checks of a real run, then the estimate printed (one per stage with --via); nothing
    is loaded or written. A later stage's teacher is the model the stage before it trains."""
    from lmdistill.train import preflight
    from lmdistill.train.setup import load_train_examples, teacher_tokenizer_of

    stages, first = None, values
    if command == "distill" and values["via"]:
        from lmdistill.train.progressive import plan_stages, stage_values

        stages = plan_stages(values)
        first = stage_values(values, stages[0], 0)
    plan = preflight.check(first, command)
    examples = load_train_examples(plan, teacher_tokenizer_of(plan))
    plans = stage_plans(plan, values, stages) if stages else [plan]
    for i, p in enumerate(plans):
        stage = f"stage {i + 1}/{len(plans)}: {p.teacher.ref} -> {p.student.ref}\n" if len(plans) > 1 else ""
        if os.environ.get("RANK", "0") == "0":  # one table for a multi-process launch
            print(stage + format_estimate(build_estimate(p, examples)), flush=True)
    return 0
