"""A lean batched decode loop: one prefill, then one token per step through the model's KV cache.

`transformers`' `generate` does the same work plus per-step machinery (logits processors, stopping criteria,
cache bookkeeping, full-vocabulary logits of the last position kept in fp32 copies); for the small models of
on-policy distillation on CPU that machinery is a large share of the step. This loop keeps only what sampling
needs: left-padded prompts with positions from the attention mask, `logits_to_keep=1`, and the same
temperature -> top-k -> top-p order as `generate` (greedy when temperature is 0). It draws by inverting each row's
cumulative distribution at one uniform number, where `torch.multinomial` draws one random number per vocabulary
entry (on CPU that draw cost more than a small model's forward), and finds the nucleus with a partial sort when
the most likely tokens hold it. Greedy output equals `generate`'s token for token (tested); sampled output has
`generate`'s distribution (tested on frequencies) but not its random stream. `benchmarks/generation.py` measures
both.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

NUCLEUS_PROBE = 64  # top-p: how many of the most likely tokens are looked at before sorting the whole row


def sample_next(logits: Tensor, temperature: float, sample_top_k: int, top_p: float) -> Tensor:
    """Next tokens [B] from last-position logits [B, V]: argmax at temperature 0, else sampled after
    temperature, top-k and nucleus (top-p) truncation, in `generate`'s order."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < sample_top_k < logits.shape[-1]:
        kth = logits.topk(sample_top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = logits.softmax(-1)
    return _draw(probs) if top_p >= 1.0 else _nucleus(probs, top_p)


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Sample within the nucleus: in descending order of probability, `generate` drops the tokens with at least
    top_p of mass strictly before them (the first is always kept). The kept tokens are a prefix of the sorted row,
    so the top NUCLEUS_PROBE tokens suffice when they hold top_p of every row's mass (a partial sort, several
    times cheaper than sorting the vocabulary); otherwise the whole row is sorted."""
    V = probs.shape[-1]
    if NUCLEUS_PROBE < V:
        sorted_probs, order = probs.topk(NUCLEUS_PROBE, -1)
        cum = sorted_probs.double().cumsum(-1)
    if NUCLEUS_PROBE >= V or not bool((cum[:, -1] >= top_p).all()):
        sorted_probs, order = probs.sort(-1, descending=True)
        cum = sorted_probs.double().cumsum(-1)
    kept = ((cum - sorted_probs) < top_p).sum(-1, keepdim=True)  # >= 1
    mass = cum.gather(-1, kept - 1)
    index = torch.searchsorted(cum, torch.rand_like(mass) * mass, right=True)
    return order.gather(-1, torch.minimum(index, kept - 1)).squeeze(-1)


def _draw(probs: Tensor) -> Tensor:
    """One index per row with probability proportional to `probs` (rows need not sum to 1), by inverting the
    row's cumulative distribution (float64) at one uniform draw: exact, and an order of magnitude cheaper on CPU
    than `torch.multinomial` or the exponential race, which draw a random number per vocabulary entry."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


class Stepper:
    """A causal LM advanced one token at a time through its KV cache: `prefill(input_ids, attention_mask)` on
    left-padded prompts, then `step(tokens [B])`; each returns the last position's logits [B, V]."""

    def __init__(self, model):
        self.model, self.cache_arg = model, _cache_argument(model)
        self.models = [model]  # what it runs (an ensemble's stepper lists its members')

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        self.mask, self.cache, self.next_position = attention_mask, _cache_of(out), positions[:, -1:] + 1
        return out.logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        self.cache, self.next_position = _cache_of(out), self.next_position + 1
        return out.logits[:, -1]


@torch.no_grad()
def decode(model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, stop_ids: Sequence[int],
           pad_token_id: int, temperature: float = 0.0, sample_top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """New tokens [B, <= max_new_tokens] after left-padded prompts [B, T]; rows that stopped are padded with
    `pad_token_id` after their stop token, and the loop ends when every row has stopped (on every process, for a
    model sharded by FSDP2: `all_done`)."""
    all_done = finished_everywhere if is_sharded(model) else _all
    stops = torch.as_tensor(list(stop_ids), device=input_ids.device)
    stepper = Stepper(model)
    logits = stepper.prefill(input_ids, attention_mask)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, sample_top_k, top_p)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        finished |= torch.isin(token, stops)
        if all_done(finished) or step == max_new_tokens - 1:
            break
        logits = stepper.step(token)
    return torch.stack(new_tokens, 1)


class MixedSample(NamedTuple):
    """`decode_mixed`'s output: tokens [B, L] (pad after a row's stop token) and, for each token, its
    log-probability [B, L] (fp32, 0 after the stop token) under the student (logq), the teacher (logp) and the
    mixture it was drawn from (logmix)."""

    tokens: Tensor
    logq: Tensor
    logp: Tensor
    logmix: Tensor


@torch.no_grad()
def decode_mixed(student: Stepper, teacher: Stepper, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 stop_ids: Sequence[int], pad_token_id: int, alpha: float, vocab_size: int) -> MixedSample:
    """MiniLLM's teacher-mixed sampling: each token drawn from alpha * p + (1 - alpha) * q at temperature 1, p the
    teacher's and q the student's next-token distribution over the first `vocab_size` ids, both models advanced
    through their own KV cache. alpha = 0 samples the student alone (the teacher still scores every token)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], found {alpha}")
    sharded = any(is_sharded(m) for m in [*student.models, *teacher.models])
    all_done = finished_everywhere if sharded else _all
    stops = torch.as_tensor(list(stop_ids), device=input_ids.device)
    zs, zt = student.prefill(input_ids, attention_mask), teacher.prefill(input_ids, attention_mask)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out: list[list[Tensor]] = [[], [], [], []]
    for step in range(max_new_tokens):
        logq = torch.log_softmax(zs[:, :vocab_size].float(), -1)
        logp = torch.log_softmax(zt[:, :vocab_size].float(), -1)
        if alpha == 0.0:
            logmix = logq
        elif alpha == 1.0:
            logmix = logp
        else:
            logmix = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
        token = _draw(logmix.exp())
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        live = (~finished).float()
        for values, lp in zip(out, (None, logq, logp, logmix)):
            values.append(token if lp is None else lp.gather(-1, token.clamp(max=vocab_size - 1)[:, None])[:, 0] * live)
        finished |= torch.isin(token, stops)
        if all_done(finished) or step == max_new_tokens - 1:
            break
        zs, zt = student.step(token), teacher.step(token)
    return MixedSample(*(torch.stack(v, 1) for v in out))


def _all(finished: Tensor) -> bool:
    return bool(finished.all())


def is_sharded(model) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors): its every forward is collective."""
    from torch.distributed.tensor import DTensor

    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return isinstance(p, DTensor)


def finished_everywhere(finished: Tensor) -> bool:
    """Every row of every process has stopped. A sharded model's forward gathers its weights from all processes,
    so all of them must run the same number of decode steps: they stop together."""
    import torch.distributed as dist

    flag = finished.all().to(torch.int32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` in transformers >= 5.2x, `past_key_values` before."""
    import inspect

    from lmdistill.models.lora import unwrap_peft

    forward = unwrap_peft(model).forward  # peft's wrapper takes **kwargs: ask the model inside
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
