"""Batched generation (greedy or sampled): left-padded prompts, HF `generate` with its KV cache, new tokens decoded.

    prompts = [render_prompt(tokenizer, messages[:-1]) for messages in records]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=64, batch_size=16)
    replies[0].text, replies[0].token_ids, replies[0].finished

Prompts are sorted by length before batching (less padding) and the replies returned in the original order.
Left padding with the attention mask gives the same tokens as generating each prompt alone (up to
floating-point ties): HF derives positions from the mask. A reply stops at the first stop token (the end of
an assistant turn `<|im_end|>`, the tokenizer's and the model's EOS), which is not part of it.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import torch

from lmdistill.errors import LmdistillError
from lmdistill.models.decode import decode, is_sharded

END_OF_TURN = "<|im_end|>"
BACKENDS = ["auto", "lean", "hf", "vllm"]  # who generates: --generation_backend (vllm: models/vllm_backend.py)


class Reply(NamedTuple):
    """One generated reply: `text` decoded without special tokens, `token_ids` before the stop token,
    `finished` False when `max_new_tokens` ran out before a stop token, `stop_token` the id that ended it."""

    text: str
    token_ids: list[int]
    finished: bool
    stop_token: int | None = None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a reply: `<|im_end|>` when the vocabulary has it, the tokenizer's EOS, the model's EOS."""
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in tokenizer.get_vocab() else None,
           tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += model_eos if isinstance(model_eos, list) else [model_eos]
    return sorted({int(i) for i in ids if i is not None})


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids, attention_mask), both (B, T), padding on the left."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, length - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                     batch_size: int = 16, device=None, eos_token_ids: Sequence[int] | None = None,
                     progress: bool = True, description: str = "generating", temperature: float = 0.0,
                     top_p: float = 1.0, sample_top_k: int = 0,
                     on_batch: Callable[[list[int], list[Reply]], None] | None = None,
                     backend: str = "auto") -> list[Reply]:
    """Replies to token-id `prompts`, `batch_size` prompts at a time, with a progress bar (tokens/s) on stderr.

    `temperature` 0 is greedy; above 0 samples (with `top_p` nucleus and `sample_top_k` truncation; torch's global
    RNG, so seed it for repeatable samples). `on_batch(indices, replies)` is called after each batch with the prompts'
    indices and their replies (e.g. to write them out as they come). `backend`: "lean" (`models.decode`), "hf"
    (`transformers`' `generate`), or "auto": whichever benchmarks/generation.py measured faster -- lean on CPU
    (greedy 1.06-1.12x, temperature sampling 1.32-1.83x, top-p 0.99-1.07x), generate on GPU (not measured there
    yet). Greedy replies are the same with either."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise LmdistillError(f"max_new_tokens and batch_size must be at least 1, found {max_new_tokens} and "
                             f"{batch_size}.")
    if not (temperature >= 0 and 0 < top_p <= 1 and sample_top_k >= 0):
        raise LmdistillError(f"sampling: expected temperature >= 0, top_p in (0, 1] and sample_top_k >= 0; found "
                             f"{temperature}, {top_p}, {sample_top_k}.")
    if any(len(p) == 0 for p in prompts):
        raise LmdistillError("generate_replies: an empty prompt; every prompt needs at least one token.")
    stops = list(eos_token_ids) if eos_token_ids is not None else stop_token_ids(tokenizer, model)
    if not stops:
        raise LmdistillError("the tokenizer has no EOS token and no <|im_end|>: replies would never stop.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=sample_top_k or None) if temperature > 0 \
        else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                              **sampling)
    device = device or next(model.parameters()).device
    if backend not in ("auto", "lean", "hf"):
        raise LmdistillError(f"backend: expected auto, lean or hf, found {backend!r}.")
    lean = backend == "lean" or (backend == "auto" and torch.device(device).type == "cpu")
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[Reply | None] = [None] * len(prompts)
    batches = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False)
    t0, generated = time.perf_counter(), 0
    try:
        for batch in bar:
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if lean:
                new = decode(model, input_ids, attention_mask, max_new_tokens, stops, pad, temperature, sample_top_k, top_p)
            else:
                new = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                     synced_gpus=is_sharded(model))[:, input_ids.shape[1]:]
            for i, row in zip(batch, new.tolist()):
                replies[i] = _reply(tokenizer, row, set(stops))
            generated += sum(len(replies[i].token_ids) for i in batch)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - t0):.0f}", refresh=False)
            if on_batch is not None:
                on_batch(list(batch), [replies[i] for i in batch])
    finally:
        bar.close()
        model.train(was_training)
    return replies


def _reply(tokenizer, new_ids: list[int], stops: set[int]) -> Reply:
    """The new tokens up to the first stop token (the batch pads finished rows after it)."""
    end = next((k for k, t in enumerate(new_ids) if t in stops), None)
    ids = new_ids if end is None else new_ids[:end]
    return Reply(tokenizer.decode(ids, skip_special_tokens=True), ids, end is not None,
                 None if end is None else new_ids[end])
