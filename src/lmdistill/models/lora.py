"""LoRA through peft: a trainable student adapter, and a teacher's adapter folder merged for speed.

    student = apply_lora(load_model("/ckpt/Qwen3-0.6B"), r=16, alpha=32)   # only LoRA params train
    teacher = load_teacher("/ckpt/Qwen3-4B", adapter="/ckpt/qwen3-4b-sft-lora")

The default targets are the attention and MLP projections that Qwen and Llama models name
q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (those present are used). In the MoE
models of transformers 5 the routed experts are fused 3-D parameters, not Linear layers, so LoRA there
reaches attention and any shared expert / dense MLP but not the routed experts. (peft >= 0.22 would turn a short
name such as `down_proj` into a target of the fused expert parameter as well, which peft cannot combine with LoRA
dropout; such names are given to peft as the full paths of the Linear layers they mean.)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lmdistill.errors import LmdistillError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 still calls `is_gradient_checkpointing`, deprecated in transformers 5; hide that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _linear_names(model: nn.Module) -> list[str]:
    """Distinct last-name components of the model's Linear layers, e.g. ['down_proj', 'lm_head', ...]."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def _linear_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """`targets` as peft should receive them: unchanged, unless a name also ends the path of a parameter that is not
    a Linear layer's (transformers 5's fused MoE experts, `experts.down_proj`); then the full paths of the Linear
    layers the names mean, so that peft >= 0.22 does not also wrap the fused parameters (`ParamWrapper`)."""
    fused = {f"{mod}.{p}" if mod else p for mod, m in model.named_modules() if not isinstance(m, nn.Linear)
             for p, _ in m.named_parameters(recurse=False)}
    ends = lambda name, t: name == t or name.endswith("." + t)  # noqa: E731
    if not any(ends(name, t) for name in fused for t in targets):
        return targets
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and any(ends(name, t) for t in targets))


def _targets(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[str] | str:
    """The LoRA target list: the given one (checked against the model) or the defaults present."""
    present = _linear_names(model)
    if target_modules is None:
        found = [t for t in DEFAULT_TARGETS if t in present]
        if not found:
            raise LmdistillError(
                f"LoRA: none of the default target modules ({', '.join(DEFAULT_TARGETS)}) exist in "
                f"{type(model).__name__}; its Linear layers are: {', '.join(present)}. Pass target_modules=[...]."
            )
        return found
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return target_modules
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not target_modules:
        raise LmdistillError(
            f"LoRA: target module(s) {missing or target_modules!r} not found in {type(model).__name__}; "
            f"its Linear layers are: {', '.join(present)}."
        )
    return list(target_modules)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = None,
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (B = 0, so outputs are unchanged at first); only they train.

    `target_modules`: names (or a comma-separated string, or "all-linear"); default: the Qwen/Llama
    projections present in the model.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LmdistillError(f"LoRA: rank r must be a positive integer, found {r!r}.")
    if not 0.0 <= dropout < 1.0:
        raise LmdistillError(f"LoRA: dropout must be in [0, 1), found {dropout!r}.")
    targets = _targets(model, target_modules)
    if isinstance(targets, list):
        targets = _linear_paths(model, targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )
    with _quiet_peft():
        return get_peft_model(model, config)


def merge_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """Apply the LoRA adapter saved in folder `adapter` to `model` and merge it into the weights.

    The result is the plain model class again (no peft wrapper), as fast as the base model.
    """
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        found = "no folder" if not path.is_dir() else "a folder without adapter_config.json"
        raise LmdistillError(
            f"teacher adapter: expected a peft LoRA adapter folder (adapter_config.json), found {found} at '{path}'."
        )
    try:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False, local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LmdistillError(f"teacher adapter '{path}' does not fit {type(model).__name__}: {exc}") from exc
    return peft_model.merge_and_unload()


def unwrap_peft(model: Any) -> nn.Module:
    """The HF model inside a peft wrapper (LoRA layers stay injected), or `model` itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
