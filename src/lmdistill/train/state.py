"""Checkpoints that survive: atomic writes, verified files, the last K kept, exact resume.

A checkpoint is `checkpoint-STEP/` holding the student as an HF folder (for a LoRA student, its adapter),
the tokenizer, `training_state.pt` (optimizer, scheduler, RNG states, step, resolved config, the training data's
fingerprint) and, written last, `manifest.json` (every file's size and BLAKE2b checksum). It is written under a
temporary name and renamed when complete, so a run killed mid-write leaves no checkpoint that looks complete.
`--resume` verifies the newest checkpoint against its manifest and falls back to the newest intact one (a disk that
filled, a crash, a copy cut short leave truncated files); a write that fails (a full disk, a read-only or failing
filesystem) removes its partial folder and says what was written where, how much space is free and which
checkpoint is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdistill import errors
from lmdistill.errors import LmdistillError

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"  # written last: each file's size and checksum
DATA_FILE = "data.json"  # the training data's identity (`lmdistill.data.identity`), checked on --resume
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
    """Write `checkpoint-STEP/` atomically (its manifest last) and delete all but the newest `keep` complete
    checkpoints and those in `protect` (the best one under --keep_best); the newest intact checkpoint is never
    deleted. A failed write removes its partial folder and raises `DiskWriteError`."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    with guarded_write(tmp, f"checkpoint-{step}", output_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model_folder(model, tokenizer, tmp)
        torch.save(training_state, tmp / STATE_FILE)
        write_config(tmp, training_state["config"])
        if training_state.get("data") is not None:
            (tmp / DATA_FILE).write_text(json.dumps(training_state["data"]) + "\n")
        write_manifest(tmp)
        _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        if old not in protect and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: Path, resume: str, strict: bool = False) -> Path:
    """`--resume` (latest in output_dir) or `--resume PATH` -> a verified checkpoint folder. The newest one that is
    damaged is named and passed over for the newest intact one (refused with `strict`); when none is intact, the
    error names each and what is wrong with it."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise LmdistillError(f"--resume: expected a checkpoint folder containing {STATE_FILE}, found none in '{path}'.")
        problem = verify_checkpoint(path)
        if problem:
            raise LmdistillError(f"--resume: checkpoint '{path}' is damaged: {problem}.")
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise LmdistillError(f"--resume: no complete checkpoint-STEP/ folder in '{output_dir}' to resume from; "
                             "drop --resume to start a new run.")
    damaged = []
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            if damaged:
                print(f"warning: --resume: {'; '.join(f'{p.name} is damaged ({why})' for p, why in damaged)}; "
                      f"resuming from {path.name}, the newest intact checkpoint.")
            return path
        damaged.append((path, problem))
        if strict:
            raise LmdistillError(f"--resume: the newest checkpoint '{path}' is damaged ({problem}); --strict_resume "
                                 "refuses to fall back to an older one. Drop --strict_resume to resume from the newest "
                                 "intact checkpoint, or --resume PATH to pick one.")
    raise LmdistillError(f"--resume: no intact checkpoint in '{output_dir}': "
                         f"{'; '.join(f'{p.name}: {why}' for p, why in damaged)}. Start anew with --overwrite.")


# -- verification -------------------------------------------------------------------------------------------
def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """`manifest.json`: every file of the folder (relative path -> size, checksum), written last."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "blake2b": _checksum(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_checkpoint(folder: Path) -> str | None:
    """None when the checkpoint is intact; else what is wrong, in a few words. With a manifest: every file present
    with its size and checksum. Without one (written before manifests existed): the training state and the
    safetensors files must at least open (their directory and header are read, not their tensors)."""
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST_FILE} is unreadable"
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size:,} bytes, the manifest says {want['bytes']:,}"
            if _checksum(path) != want["blake2b"]:
                return f"{name} does not match its checksum"
        return None
    import zipfile

    if not zipfile.is_zipfile(folder / STATE_FILE):
        return f"{STATE_FILE} is truncated or not a torch file"
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types for a cut header
            return f"{path.name} does not open ({' '.join(str(exc).split())[:80]})"
    return None


# -- writes that fail ---------------------------------------------------------------------------------------
RESUME_ADVICE = "Free space (or lower --keep_checkpoints), then resume with the same command plus --resume."


def intact_text(where: Path) -> str:
    """'the last complete checkpoint, X, is intact' (or that none was written yet), for messages."""
    found = [p for p in list_checkpoints(where) if verify_checkpoint(p) is None] if where.is_dir() else []
    return f"the last complete checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written yet"


def guarded_write(partial: Path, what: str, where: Path):
    """`lmdistill.errors.guarded_write` for a run folder: names the newest intact checkpoint."""
    return errors.guarded_write(partial, what, where, _LazyIntact(where), RESUME_ADVICE)


class _LazyIntact:
    """The intact-checkpoint text, worked out only when a message needs it (it verifies checkpoints)."""

    def __init__(self, where: Path):
        self.where = where

    def __str__(self) -> str:
        return intact_text(self.where)


def check_space(where: Path, need: int, what: str) -> None:
    errors.check_space(where, need, what, _LazyIntact(where), RESUME_ADVICE)


def model_bytes(model) -> int:
    """The model's weights on disk, about (each tensor once) plus a little for configs and the tokenizer."""
    tensors = {id(t): t for t in model.state_dict().values() if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 2**20


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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
