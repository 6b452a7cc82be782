"""Checkpoints that survive: atomic writes, the last K kept, exact resume.

A checkpoint is `checkpoint-STEP/` holding the student as an HF folder (for a LoRA student, its adapter),
the tokenizer, and `training_state.pt` (optimizer, scheduler, RNG states, step, resolved config). It is
written under a temporary name and renamed when complete, so a run killed mid-write leaves no checkpoint
that looks complete; resume picks the newest complete one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdistill.errors import LmdistillError

STATE_FILE = "training_state.pt"
CONFIG_FILE = "lmdistill_config.yaml"  # the resolved options, at the run's root and in every checkpoint
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# Feature distillation's projectors live on the student (so the optimizer, DDP and checkpoints see them) under this
# name, and are saved beside the model in their own file, never inside the exported HF model.
PROJECTORS_ATTR = "lmdistill_feature_projectors"
PROJECTORS_FILE = "feature_projectors.safetensors"


def projectors_of(model):
    """The feature projectors attached to the student (through DDP/FSDP wrappers), or None."""
    while not hasattr(model, PROJECTORS_ATTR) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return getattr(model, PROJECTORS_ATTR, None)


class _Detached:
    """Take the projectors off the model for a save (restored after)."""

    def __init__(self, model):
        self.model, self.module = model, model._modules.pop(PROJECTORS_ATTR, None)

    def __enter__(self):
        return self.module

    def __exit__(self, *exc):
        if self.module is not None:
            self.model.add_module(PROJECTORS_ATTR, self.module)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_folder(model, tokenizer, folder: Path, merge_lora: bool = False) -> None:
    """An HF folder that `from_pretrained` loads alone; a LoRA student is saved merged when asked."""
    from safetensors.torch import save_file

    from lmdistill.models.lora import unwrap_peft

    with _Detached(model) as projectors:
        if merge_lora and hasattr(model, "peft_config"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model = model if hasattr(model, "peft_config") else unwrap_peft(model)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    if projectors is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()},
                  str(Path(folder) / PROJECTORS_FILE), metadata={"pairs": repr(projectors.pairs)})


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, training_state: dict, keep: int,
                    protect: list[Path] = ()) -> Path:
    """Write `checkpoint-STEP/` atomically and delete all but the newest `keep` complete checkpoints and those in
    `protect` (the best one under --keep_best)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_folder(model, tokenizer, tmp)
    torch.save(training_state, tmp / STATE_FILE)
    write_config(tmp, training_state["config"])
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        if old not in protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path:
    """`--resume` (latest in output_dir) or `--resume PATH` -> a complete checkpoint folder."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise LmdistillError(f"--resume: expected a checkpoint folder containing {STATE_FILE}, found none in '{path}'.")
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise LmdistillError(f"--resume: no complete checkpoint-STEP/ folder in '{output_dir}' to resume from; "
                             "drop --resume to start a new run.")
    return found[-1]


def write_config(folder: Path, config: dict) -> None:
    import yaml

    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def read_config(checkpoint: Path) -> dict:
    """The options a checkpoint was trained with (from its config file; older checkpoints: the training state)."""
    import yaml

    if (checkpoint / CONFIG_FILE).is_file():
        return yaml.safe_load((checkpoint / CONFIG_FILE).read_text()) or {}
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
    return dict(state.get("config", {}))


def load_model_weights(model, folder: Path) -> None:
    """Load a checkpoint's weights into the live (possibly peft-wrapped) student, exactly."""
    from safetensors.torch import load_file

    projectors = projectors_of(model)
    if projectors is not None:
        if not (folder / PROJECTORS_FILE).is_file():
            raise LmdistillError(f"resume: checkpoint '{folder}' has no {PROJECTORS_FILE}; it was not trained with "
                                 "--feature_loss.")
        projectors.load_state_dict(load_file(folder / PROJECTORS_FILE))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise LmdistillError(f"resume: expected model*.safetensors in '{folder}', found none.")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(PROJECTORS_ATTR + ".")]
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise LmdistillError(f"resume: checkpoint '{folder}' does not match the student: missing "
                             f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    if tied:
        model.tie_weights()
