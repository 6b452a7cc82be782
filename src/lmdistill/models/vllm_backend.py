"""Optional vLLM generation backend (`--generation_backend vllm`; CUDA only, `pip install vllm`).

    engine = VllmGenerator(folder, tokenizer, gpu_memory_utilization=0.3)
    engine.sync(student)                       # the student's current weights, LoRA merged, loaded into vLLM
    replies = engine.replies(prompts, max_new_tokens=128, temperature=1.0, stops=[eos], seeds=[...])

Colocated, as TRL's `vllm_mode="colocate"`: the engine lives in the training process on the same GPU
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, a share of its memory) and the trainer loads the student's weights into it
before generating whenever an optimizer step changed them (`collective_rpc` on the worker's model
`load_weights`, which takes Hugging Face parameter names). Each reply is sampled with its own seed, so a run's
replies are a function of (seed, step, rank, prompt) and a resumed run writes the same ones. vLLM runs the
architectures it knows (Qwen, Llama, ..., and the MiniMind presets, which are stock Qwen3/Llama configs); another
is refused with vLLM's own error.

Replies come back as `lmdistill.models.generation.Reply`s: the tokens before the stop token, and the stop token
(vLLM reports it in `token_ids` or as `stop_reason`) so on-policy training sees it as the other backends give it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch

from lmdistill.errors import LmdistillError
from lmdistill.models.generation import Reply

FLAG = "--generation_backend vllm"


def check_vllm(device: str | None, flag: str = FLAG) -> None:
    """Before any model loads: vLLM is importable and the run is on a CUDA device."""
    if importlib.util.find_spec("vllm") is None:
        raise LmdistillError(f"{flag}: vLLM is not installed here (pip install vllm, on a CUDA machine); use "
                             "--generation_backend auto.")
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        found = device or "cpu (no CUDA GPU here)"
        raise LmdistillError(f"{flag}: vLLM generates on CUDA GPUs only; the run's device is {found}. Use "
                             "--generation_backend auto on CPU.")


def hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under Hugging Face checkpoint names, LoRA adapters merged into the base weights
    (the caller must use them before `unmerge`; see `VllmGenerator.sync`)."""
    state = model.state_dict()
    if not hasattr(model, "peft_config"):
        return dict(state)
    out = {}
    for name, value in state.items():
        if "lora_" in name or ".original_module." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(
            ".modules_to_save.default.", ".")
        out[name] = value
    return out


def _load_weights(worker, weights: list) -> None:  # runs on the vLLM worker (in this process)
    worker.model_runner.model.load_weights(weights=weights)


class VllmGenerator:
    """A vLLM engine for one model, built from an HF folder (config, weights, tokenizer)."""

    def __init__(self, folder: str | Path, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights load in
        from vllm import LLM

        try:
            self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=dtype, seed=seed,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        except Exception as exc:  # vLLM's own errors name the unsupported architecture, memory, ...
            raise LmdistillError(f"{FLAG}: vLLM could not load the model from {folder}: {exc}. Use "
                                 "--generation_backend auto.") from exc
        self.tokenizer = tokenizer

    def sync(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights into the engine (a LoRA model's adapters merged for the copy)."""
        peft = hasattr(model, "peft_config")
        if peft:
            model.merge_adapter()
        try:
            with torch.no_grad():
                weights = list(hf_weights(model).items())
                self.llm.collective_rpc(_load_weights, args=(weights,))
        finally:
            if peft:
                model.unmerge_adapter()
        if hasattr(self.llm, "reset_prefix_cache"):  # cached prefixes hold the old weights' keys and values
            self.llm.reset_prefix_cache()

    def replies(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
                top_p: float = 1.0, sample_top_k: int = 0, stops: Sequence[int] = (), seeds: Sequence[int] | None = None
                ) -> list[Reply]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 **({"top_k": sample_top_k} if sample_top_k > 0 else {}), stop_token_ids=list(stops),
                                 seed=s)
                  for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [self._reply(o.outputs[0], set(stops)) for o in outputs]

    def _reply(self, completion, stops: set[int]) -> Reply:
        ids = list(completion.token_ids)
        stop = None
        if ids and ids[-1] in stops:
            stop = ids.pop()
        elif completion.finish_reason == "stop":  # stopped on a stop token vLLM did not keep in token_ids
            reason = getattr(completion, "stop_reason", None)
            eos = self.tokenizer.eos_token_id
            stop = reason if isinstance(reason, int) else (eos if eos in stops else min(stops, default=None))
        return Reply(self.tokenizer.decode(ids, skip_special_tokens=True), ids, stop is not None, stop)


def reply_seeds(seed: int, step: int, rank: int, n: int) -> list[int]:
    """One sampling seed per prompt of a step: a function of (run seed, step, rank, index) only."""
    import random

    rng = random.Random(f"{seed}:{step}:{rank}")
    return [rng.randrange(2**31) for _ in range(n)]
