"""Load a model: a preset name -> a new HF model; a folder -> any local HF causal LM. Never downloads.

    model = load_model("minimind2-small", tokenizer)                      # new, random weights
    model = load_model("/ckpt/Qwen3-0.6B", dtype="bfloat16", device="cuda")
    teacher = load_teacher("/ckpt/Qwen3-4B", adapter="/ckpt/qwen3-4b-lora")  # LoRA merged, frozen, eval

`dtype=None` keeps Hugging Face's default: float32 for a new model, the checkpoint's own dtype
("auto") for a folder. `device="meta"` builds a preset without allocating memory (parameter counts).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmdistill.errors import LmdistillError
from lmdistill.models.hidden import num_experts
from lmdistill.models.presets import PRESETS, build_config

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# knobs that only make sense when building a preset
_PRESET_ONLY = ("vocab_size", "hidden_size", "dim", "num_layers", "n_layers", "use_moe")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """`torch.bfloat16` / "bfloat16" / "bf16" -> torch.bfloat16; "auto" and None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise LmdistillError(f"dtype: expected one of float32, bfloat16, float16, auto; found {dtype!r}.")
    return _DTYPES[key]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameter counts; tied weights count once.

    active = per-token active parameters: for MoE models, everything outside the routed experts plus
    top_k / num_experts of the expert parameters (modules named `experts`; shared experts count fully).
    Dense models: active == total. Works on the meta device.
    """
    config = getattr(model, "config", None)
    active_experts = getattr(config, "num_experts_per_tok", None)
    n_experts = num_experts(config)
    total = experts = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if "experts" in name.split("."):
            experts += param.numel()
    if not (experts and active_experts and n_experts):
        return total, total
    return total, total - experts + experts * active_experts // n_experts


def format_count(n: int) -> str:
    """25829888 -> '25.83M'."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def describe(model: nn.Module) -> str:
    """'N params' or, for MoE, 'N params (M active)'."""
    total, active = count_parameters(model)
    text = f"{format_count(total)} params"
    return text if active == total else f"{text} ({format_count(active)} active)"


def _build_preset(name: str, tokenizer: Any, dtype: Any, device: Any, overrides: dict[str, Any]) -> PreTrainedModel:
    vocab_size = overrides.pop("vocab_size", None)
    if vocab_size is None:
        if tokenizer is None:
            raise LmdistillError(
                f"model preset '{name}': the vocabulary size comes from the tokenizer; pass tokenizer=... "
                "or vocab_size=N."
            )
        vocab_size = len(tokenizer)
    elif tokenizer is not None and vocab_size < len(tokenizer):
        raise LmdistillError(
            f"model preset '{name}': vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)."
        )
    config = build_config(name, vocab_size, tokenizer=tokenizer, **overrides)
    dtype = None if dtype == "auto" else dtype
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))


def check_model_folder(path: Path) -> None:
    """A clear error unless `path` is a folder holding a HF model (config.json)."""
    valid = ", ".join(PRESETS)
    if not path.is_dir():
        found = "a file, not a folder" if path.exists() else "no such folder"
        raise LmdistillError(
            f"model '{path}': {found}, and not a preset name. Expected a local folder with a Hugging Face model "
            f"(config.json) or a preset ({valid})."
        )
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        raise LmdistillError(
            f"model: '{path}' holds a LoRA adapter (adapter_config.json), not a model; load its base model and "
            "pass this folder as the adapter."
        )
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "an empty folder"
    raise LmdistillError(f"model: expected config.json in the model folder '{path}'; found {found}.")


def _load_folder(path: Path, tokenizer: Any, dtype: Any, device: Any, extra: dict[str, Any]) -> PreTrainedModel:
    check_model_folder(path)
    given = sorted(k for k in _PRESET_ONLY if extra.get(k) is not None)
    if given:
        raise LmdistillError(
            f"model '{path}': {', '.join(given)} only apply to presets; a saved model keeps its own architecture."
        )
    # the training length is the data's business; a saved model keeps its max_position_embeddings
    kwargs = {k: v for k, v in extra.items() if k != "max_seq_len" and v is not None}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise LmdistillError(f"model: could not load a causal LM from '{path}': {exc}") from exc
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > rows:
        raise LmdistillError(
            f"model '{path}' embeds {rows} tokens but the tokenizer has {len(tokenizer)}: the model was not trained "
            "with this tokenizer (models trained or compared together must share one vocabulary)."
        )
    return model


def load_model(
    name_or_path: str | Path,
    tokenizer: Any | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    verbose: bool = True,
    **overrides: Any,
) -> PreTrainedModel:
    """A preset name -> a new model built from its config; a folder -> `from_pretrained`, offline.

    For a preset the vocabulary size is `len(tokenizer)` (or `vocab_size=`) and `overrides` are the
    knobs of `build_config`. For a folder, `overrides` go to `from_pretrained` (e.g.
    `attn_implementation="sdpa"`, `trust_remote_code=True` for a local MiniMind checkpoint);
    `max_seq_len` is ignored there and the architecture knobs (hidden_size, ...) are errors.
    Prints "built <name>: N params (M active)" when `verbose`.
    """
    dtype = parse_dtype(dtype)
    name = str(name_or_path)
    if name in PRESETS:
        model = _build_preset(name, tokenizer, dtype, device, overrides)
        verb = "built"
    else:
        model = _load_folder(Path(name).expanduser(), tokenizer, dtype, device, overrides)
        verb = "loaded"
    if verbose:
        print(f"{verb} {name}: {describe(model)}")
    return model


def load_teacher(
    path_or_preset: str | Path,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any | None = None,
    verbose: bool = True,
    **overrides: Any,
) -> PreTrainedModel:
    """A frozen teacher: eval mode, requires_grad False everywhere, a LoRA `adapter` folder merged in."""
    from lmdistill.models.lora import merge_adapter

    model = load_model(path_or_preset, tokenizer=tokenizer, dtype=dtype, device=device, verbose=verbose, **overrides)
    if adapter is not None:
        model = merge_adapter(model, adapter)
        if verbose:
            print(f"merged LoRA adapter {adapter} into {path_or_preset}")
    model.eval()
    model.requires_grad_(False)
    return model


def check_model_ref(flag: str, value: str, presets: bool = True) -> None:
    """`value` is a preset name (when allowed) or a folder holding a HF model; else say which it is not."""
    if presets and value in PRESETS:
        return
    try:
        check_model_folder(Path(value).expanduser())
    except LmdistillError as exc:
        raise LmdistillError(f"{flag}: {exc}") from None


def check_device(device: str | None) -> None:
    """`--device`: cpu, cuda or cuda:N, and a CUDA device must exist here."""
    if device is None or device == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise LmdistillError(f"--device: expected cpu, cuda or cuda:N, found '{device}'.")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise LmdistillError(f"--device {device}: no usable CUDA GPU here ({build}; torch.cuda.is_available() is "
                             "False). Use --device cpu, or leave --device unset to take a GPU when there is one.")
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise LmdistillError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
