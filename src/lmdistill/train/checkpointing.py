"""What the Trainer keeps on disk and restores: checkpoints (exact resume), the final export, stop signals.

A checkpoint holds the student's weights, the optimizer and scheduler, every rank's RNG state, the options and the
health state (`lmdistill.train.state` writes the files); the step number alone fixes the data order, so resuming
from it continues the run exactly. SIGINT/SIGTERM finish the step, save and stop with 130/143.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from lmdistill.errors import DiskWriteError, free_bytes, size_text
from lmdistill.train import state as ckpt


class CheckpointMixin:
    """The Trainer's checkpoint, export and signal handling (it uses `plan`, `out`, `acc`, `model`, `optimizer`,
    `scheduler`, `health`, `global_step`, `world`, `rank` of the Trainer)."""

    def config_record(self) -> dict:
        """The options as the run folder and checkpoints record them (compared on --resume, read by the report)."""
        return {"command": self.plan.command, **self.plan.values}

    def training_state(self, rng_per_rank: list) -> dict:
        return {"step": self.global_step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
                "config": self.config_record(), "health": self.health.state_dict(),
                "data": {**self.data_identity, "examples": len(self.examples)}}

    def checkpoint_bytes(self) -> int:
        """About what the next checkpoint takes on disk: the newest one's size, else the student's weights (each
        tensor once) plus the optimizer state."""
        found = ckpt.list_checkpoints(self.out)
        if found:
            return ckpt.folder_bytes(found[-1])
        tensors = {id(t): t for t in self.unwrapped().parameters()}
        for state in self.optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if torch.is_tensor(t)})
        return sum(t.numel() * t.element_size() for t in tensors.values()) + 2**20

    def save_checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        path = self.out / f"checkpoint-{self.global_step}"
        if self._saved_step == self.global_step:  # e.g. the best checkpoint, then the save interval's
            return path
        self._saved_step, path, error = self.global_step, None, None
        rng = gather_object([ckpt.rng_state()]) if self.world > 1 else [ckpt.rng_state()]  # every rank's sampling
        if self.acc.is_main_process:
            try:
                need = self.checkpoint_bytes()
                ckpt.check_space(self.out, need, f"checkpoint-{self.global_step}")
                path = ckpt.save_checkpoint(self.out, self.global_step, self.unwrapped(), self.tokenizer,
                                            self.training_state(rng), self.plan.output.keep_checkpoints,
                                            protect=self.health.protected(self.out))
                self._warn_space(need, "the next checkpoint")
            except DiskWriteError as exc:
                error = exc
        if self._sum(1.0 if error else 0.0) > 0:  # every rank stops together
            raise error or DiskWriteError("the main process could not write the checkpoint (see its error).")
        self.acc.wait_for_everyone()
        return path

    def _warn_space(self, need: int, what: str) -> None:
        free = free_bytes(self.out)
        if free < need:
            print(f"warning: {what} (about {size_text(need)}) will not fit: {size_text(free)} free in "
                  f"'{self.out}'. Free space or lower --keep_checkpoints before the run gets there.", flush=True)

    def check_start_space(self) -> None:
        """Before step 1: refuse a run whose first save (a checkpoint, or the final model) cannot fit."""
        error = None
        if self.acc.is_main_process:
            try:
                ckpt.check_space(self.out, self.checkpoint_bytes() if self.plan.output.save_interval else
                                 ckpt.model_bytes(self.unwrapped()), "the run's first save")
            except DiskWriteError as exc:
                error = exc
        if self._sum(1.0 if error else 0.0) > 0:
            raise error or DiskWriteError("the main process's output folder has no space (see its error).")

    def resume(self, folder: Path) -> None:
        state = torch.load(folder / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
        ckpt.load_model_weights(self.unwrapped(), folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank") or []
        ckpt.set_rng_state(per_rank[self.rank] if len(per_rank) == self.world else state["rng"])
        self.global_step = state["step"]
        self.health.load_state_dict(state.get("health"))
        before = (state.get("data") or {}).get("examples")
        if before is not None and before != len(self.examples) and self.acc.is_main_process:
            print(f"warning: --resume: {folder.name} was trained on {before:,} examples, the data now gives "
                  f"{len(self.examples):,}; the example order continues from step {self.global_step} over the new "
                  "data (seeded by --seed and the step), so this is not the run the checkpoint was part of.")
        if self.acc.is_main_process:
            _truncate_metrics(self.out / "metrics.jsonl", self.global_step)
            print(f"resumed from {folder} at step {self.global_step}")

    def finish(self) -> None:
        """The final student as an HF folder (LoRA merged; adapter in adapter/) plus the last checkpoint; under
        --keep_best the final student is the best checkpoint's and the last model stays in its checkpoint."""
        if self.plan.output.save_interval or self.health.keep_best:
            self.save_checkpoint()
        self.health.export_best(self)
        error = None
        if self.acc.is_main_process:
            try:
                self._export()
            except DiskWriteError as exc:
                error = exc
        if self._sum(1.0 if error else 0.0) > 0:
            raise error or DiskWriteError("the main process could not write the final model (see its error).")
        self.acc.wait_for_everyone()

    def _export(self) -> None:
        model = self.unwrapped()
        tmp = self.out / f".final.tmp-{os.getpid()}"
        ckpt.check_space(self.out, ckpt.model_bytes(model), "the final model")
        with ckpt.guarded_write(tmp, "the final model", self.out):
            ckpt.save_model_folder(model, self.tokenizer, tmp, merge_lora=True)
            if hasattr(model, "peft_config"):
                model.save_pretrained(tmp / "adapter")
        for f in tmp.iterdir():
            if f.is_dir() and (self.out / f.name).is_dir():
                import shutil

                shutil.rmtree(self.out / f.name)
            os.replace(f, self.out / f.name)
        tmp.rmdir()
        print(f"saved the {'student' if self.distilling else 'model'} to {self.out}")

    # -- signals -----------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM finish the step and save; returns the handlers they replace (restored after train)."""
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, handler)
        return previous

    def _stop_requested(self) -> bool:
        return bool(self._sum(1.0 if self.stop_signal else 0.0) > 0)


def debug_hooks(step: int) -> None:
    """Test hooks: LMDISTILL_KILL_AT_STEP=k sends SIGKILL after step k; LMDISTILL_SIGTERM_AT_STEP and
    LMDISTILL_SIGINT_AT_STEP likewise."""
    hooks = (("LMDISTILL_KILL_AT_STEP", signal.SIGKILL), ("LMDISTILL_SIGTERM_AT_STEP", signal.SIGTERM),
             ("LMDISTILL_SIGINT_AT_STEP", signal.SIGINT))
    for var, sig in hooks:
        if os.environ.get(var) == str(step):
            os.kill(os.getpid(), sig)


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what the interrupted run logged after its checkpoint."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))
