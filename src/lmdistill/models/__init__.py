"""Models: presets that build plain Hugging Face configs, local checkpoints, LoRA, and hidden-state access.

    from lmdistill.models import load_model, load_teacher, apply_lora, forward_hidden, lm_head_of
    student = apply_lora(load_model("minimind2-small", tokenizer))   # "built minimind2-small: 25.83M params"
    teacher = load_teacher("/ckpt/Qwen3-4B", adapter="/ckpt/lora", dtype="bfloat16")
    hidden, aux = forward_hidden(student, input_ids, attention_mask)  # [B, T, H], MoE aux loss or None
    weight, bias, scale, softcap = lm_head_of(student)                # [V, H] live parameter

See `presets.py` for the preset table with exact parameter counts (at MiniMind's 6,400-token vocabulary, as in
the 25.83M above; the count grows by hidden_size per token of the tokenizer) and how each maps to MiniMind.
"""

from lmdistill.models.hidden import HiddenOutput, LmHead, forward_hidden, is_moe, lm_head_of
from lmdistill.models.loading import count_parameters, describe, load_model, load_teacher, parse_dtype
from lmdistill.models.lora import DEFAULT_TARGETS, apply_lora, merge_adapter
from lmdistill.models.presets import PRESETS, Preset, build_config

__all__ = [
    "DEFAULT_TARGETS",
    "PRESETS",
    "HiddenOutput",
    "LmHead",
    "Preset",
    "apply_lora",
    "build_config",
    "count_parameters",
    "describe",
    "forward_hidden",
    "is_moe",
    "lm_head_of",
    "load_model",
    "load_teacher",
    "merge_adapter",
    "parse_dtype",
]
