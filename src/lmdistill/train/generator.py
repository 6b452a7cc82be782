"""The student's replies during training: one object that owns how they are sampled and its lifecycle.

    generator = StudentGenerator(plan.source.generation, tokenizer, seed, rank, device, dtype, student, step)
    replies = generator.replies(prompts)     # token-id prompts -> lmdistill.models.generation.Reply
    generator.close()

Backends: the lean decode loop (CPU), transformers' generate, or a colocated vLLM engine (`--generation_backend
vllm`, CUDA only): built from the student at its first use, given the student's weights again whenever an optimizer
step changed them; each vLLM reply is seeded by (seed, step, rank, call, index), so resume is exact. The other
backends draw from torch's RNG, whose state the checkpoints keep.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable


class StudentGenerator:
    def __init__(self, generation, tokenizer, seed: int, rank: int, device, dtype: str, student: Callable,
                 step: Callable[[], int]):
        """`generation`: the plan's `GenerationPlan`; `student()` the current (unwrapped) student; `step()` the
        optimizer steps done."""
        self.gen, self.tokenizer, self.seed, self.rank, self.device, self.dtype = (
            generation, tokenizer, seed, rank, device, dtype)
        self.student, self.step = student, step
        self._vllm = None
        self._vllm_dir = None
        self._at = (0, 0)  # (step, calls at that step) of the vLLM engine

    def replies(self, prompts: list[list[int]]) -> list:
        from lmdistill.models.generation import generate_replies

        g = self.gen
        if g.backend == "vllm":
            return self._vllm_replies(prompts)
        return generate_replies(self.student(), self.tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                                batch_size=len(prompts), device=self.device, progress=False, temperature=g.temperature,
                                top_p=g.top_p, backend=g.backend)

    def _vllm_replies(self, prompts: list[list[int]]) -> list:
        from lmdistill.models.generation import stop_token_ids
        from lmdistill.models.vllm_backend import VllmGenerator, reply_seeds
        from lmdistill.train.state import save_model_folder

        g, model, now = self.gen, self.student(), self.step()
        if self._vllm is None:
            self._vllm_dir = tempfile.TemporaryDirectory(prefix="lmdistill-vllm-")
            save_model_folder(model, self.tokenizer, Path(self._vllm_dir.name), merge_lora=True)
            self._vllm = VllmGenerator(self._vllm_dir.name, self.tokenizer, dtype=self.dtype,
                                       gpu_memory_utilization=g.vllm_gpu_memory_utilization, seed=self.seed)
            self._at = (now, 0)
        step, calls = self._at
        if step != now:
            self._vllm.sync(model)
            step, calls = now, 0
        self._at = (step, calls + 1)
        return self._vllm.replies(prompts, g.max_new_tokens, g.temperature, g.top_p, 0,
                                  stop_token_ids(self.tokenizer, model),
                                  reply_seeds(self.seed, step, self.rank * 1000 + calls, len(prompts)))

    def close(self) -> None:
        if self._vllm_dir is not None:
            self._vllm_dir.cleanup()
            self._vllm_dir, self._vllm = None, None
