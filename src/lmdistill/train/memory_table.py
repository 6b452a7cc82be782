"""The memory plan of `--dry_run` as a table: each part's bytes per device, without and with gradient
checkpointing, and whether it fits."""

from __future__ import annotations

import os

from lmdistill.train.memory import MiB, Estimate


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _summary(est: Estimate) -> list[str]:
    r, s = est.run, est.student
    how = f"LoRA r={s.lora_r} on {', '.join(s.lora_targets)}" if s.lora_targets else "full training"
    role = "student" if r.command == "distill" else "model"
    lines = [f"lmdistill {r.command} --dry_run: configs only (meta device); no weights loaded, nothing written",
             f"  {role}  {s.name}: {s.describe()}: {s.params:,} parameters, {s.trainable + r.extra_trainable:,} "
             f"trainable ({how})"]
    for t in est.teachers:
        lines.append(f"  teacher  {t.name} ({t.dtype}): {t.model.describe()}: {t.model.params:,} parameters" if t.model
                     else f"  teacher  cache {t.name}: top-{t.rows_k} rows, {size_text(t.cache_bytes)} (no weights)")
    per = f"{r.batch_size} x {r.accumulation_steps} accumulation x {r.world} process(es) x {r.train_len}"
    return lines + [f"  data: {est.data}",
                    f"  tokens per optimizer step: {per} = {est.tokens_per_step:,} (at most: shorter examples are "
                    "padded per batch only)",
                    f"  optimizer steps: {est.steps if est.steps is not None else '?'} ({est.steps_from})",
                    f"  loss: chunks of {est.chunk:,} positions x {s.vocab:,} logits (fp32)",
                    *_generation_lines(est), ""]


def _generation_lines(est: Estimate) -> list[str]:
    r = est.run
    if not r.reply_tokens:
        return []
    how = "vLLM" if r.vllm_bytes else "the student's KV cache" + (" and the teacher's" if r.teacher_kv else "")
    return [f"  on-policy: replies of up to {r.reply_tokens:,} tokens (--max_new_tokens) after prompts of up to "
            f"{r.prompt_tokens:,}: rows of up to {r.train_len:,} tokens are trained; generation with {how}"]


def format_estimate(est: Estimate) -> str:
    """The estimate as a table: each part's bytes per device without and with gradient checkpointing."""
    r, s, cpu = est.run, est.student, est.run.device == "cpu"
    setup = "1 process" if r.strategy == "single" else f"{r.strategy.upper().replace('ZERO2', 'ZeRO-2')} over {r.world}"
    head = f"memory per device ({r.device}, {r.dtype}, {setup})"
    lines = _summary(est) + [f"{head:<62}{'no checkpointing':>18}{'--gradient_checkpointing':>26}"]
    teacher = ("teacher (weights, final hidden, one layer's forward)" if any(t.model for t in est.teachers)
               else "teacher (the batch's cached rows)")
    rows = [("weights (student: fp32" + (" + autocast copies)" if r.dtype != "float32" else ")"), est.weights),
            ("gradients (fp32, trainable parameters)", est.gradients),
            ("optimizer state (AdamW: 2 x fp32 per trainable parameter)", est.optimizer),
            (f"activations (student, {r.batch_size} x {r.train_len} tokens)", None),
            (teacher, est.teacher if est.teachers else None),
            (f"loss ({est.buffers} x [{est.chunk}, {s.vocab}] fp32 + hidden-state grad)", est.loss)]
    if est.generation:
        rows.append((f"generation (KV cache of {r.batch_size} x {r.prompt_tokens + r.reply_tokens} positions, "
                     "prefill)", est.generation))
    if r.vllm_bytes:
        rows.append(("vLLM's reserved share (--vllm_gpu_memory_utilization)", r.vllm_bytes))
    labels = {"baseline": "process baseline (python, torch, transformers: RSS)", "data": "tokenized data (in the "
              "process)", "teacher_cache": "teacher cache files (held in RAM)"}
    rows += [(labels[k], v) for k, v in est.host.items() if cpu]
    for label, value in rows:
        a, b = (est.activations, est.activations_checkpointed) if label.startswith("activations") else (value, value)
        if a is not None:
            lines.append(f"  {label:<60}{size_text(a) + '  ':>18}{size_text(b) + '  ':>26}")
    mark = lambda on: " *" if on == r.gradient_checkpointing else "  "  # noqa: E731
    if est.generation:
        lines.append("  (generation and the training forward are not alive at once: the total counts the larger of "
                     "activations + loss and generation)")
    lines.append(f"  {'total (estimated peak; * = this run)':<60}{size_text(est.total(False)) + mark(False):>18}"
                 f"{size_text(est.total(True)) + mark(True):>26}")
    if not cpu and "teacher_cache" in est.host:
        lines.append(f"host memory, not in the total: teacher cache files {size_text(est.host['teacher_cache'])}")
    if est.visible is not None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", r.world)) if cpu else 1  # CPU processes share the RAM
        need = est.total(r.gradient_checkpointing) * local
        share = f" ({local} processes share it)" if local > 1 else ""
        lines.append(f"device memory visible: {est.visible_what}{share}; fits: "
                     f"{'yes' if need <= est.visible else 'NO'} ({need / max(est.visible, 1):.0%} of it)")
    return "\n".join(lines + [f"note: {n}" for n in est.notes])
