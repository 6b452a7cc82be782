"""On-policy batches (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models"): on a seeded share
of the optimizer steps, the student writes the replies it is trained on.

On such a step every example of a micro-batch keeps its prompt -- the conversation up to its last assistant turn,
i.e. the tokens before its last trained span -- and the current student completes it (sampled with the KV cache,
eval mode, no grad; training mode restored). The sequence prompt + completion (+ the stop token the student
produced) is then scored by the teacher and the loss is taken on the completion tokens only, with whatever
divergence, temperature and top_k the run uses: `--divergence reverse_kl --on_policy_fraction 1` is on-policy
reverse KL, `--divergence jsd --jsd_beta B --on_policy_fraction L` is GKD. Other steps use the dataset's replies.

Examples without a prompt (plain-text blocks, where every token is trained) stay as they are on such steps instead
of failing (a data file holds one record shape, so today this matters for plain-text data, which on-policy steps
then leave unchanged).

Which steps are on-policy is a function of (seed, step) alone, and the sampling draws from torch's RNG, whose
state the checkpoints keep: a resumed run writes the same completions as the uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from lmdistill.config import float_in
from lmdistill.data import IGNORE_INDEX, pad_batch
from lmdistill.data.batch import Batch
from lmdistill.errors import LmdistillError
from lmdistill.teachers.registry import SCORES_NEW_TEXT, why_not
from lmdistill.train.batches import BatchSource, DatasetStream, SourceKind, register_source


def last_prompt(example: dict) -> list[int]:
    """The tokens before an example's last trained span (its last assistant reply); an example with nothing
    trained is all prompt (`lmdistill.data.prompt_examples`)."""
    labels = example["labels"]
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return list(example["input_ids"])
    start = trained[-1]
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(example["input_ids"][:start])


def completion_example(prompt: Sequence[int], reply) -> dict:
    """prompt + the student's reply (+ its stop token), trained on the reply only (labels aligned, HF style)."""
    completion = list(reply.token_ids) + ([reply.stop_token] if reply.stop_token is not None else [])
    return {"input_ids": list(prompt) + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


class OnPolicyStream(BatchSource):
    """The dataset stream, with the replies of a seeded `fraction` of the steps written by `generate`
    (token-id prompts -> `lmdistill.models.generation.Reply`s)."""

    def __init__(self, dataset: DatasetStream, fraction: float, seed: int, generate: Callable[[list], list]):
        self.dataset, self.fraction, self.seed, self.generate = dataset, fraction, seed, generate

    def on_policy(self, step: int) -> bool:
        return self.fraction >= 1 or (self.fraction > 0 and random.Random(f"{self.seed}:{step}").random() < self.fraction)

    def batches(self, step: int) -> list[Batch]:
        batches = self.dataset.batches(step)
        if not self.on_policy(step):
            self.last_stats = {"on_policy": False}
            return batches
        out, generated, cut, n = [], 0, 0, 0
        for batch in batches:
            examples = [self.dataset.examples[i] for i in batch.example_index]
            prompts = [last_prompt(ex) for ex in examples]
            rows = [k for k, p in enumerate(prompts) if p]  # a text block has no prompt: it stays off-policy
            replies = self.generate([prompts[k] for k in rows]) if rows else []
            for k, reply in zip(rows, replies):
                examples[k] = completion_example(prompts[k], reply)
            out.append(Batch.of(pad_batch(examples, self.dataset.pad), self.dataset.device, batch.example_index))
            generated += sum(len(r.token_ids) for r in replies)
            cut += sum(not r.finished for r in replies)
            n += len(replies)
        self.last_stats = {"on_policy": True, "generated_tokens": generated,
                           "mean_completion_tokens": generated / max(n, 1), "cut_share": cut / max(n, 1)}
        return out


@register_source
class OnPolicySource(SourceKind):
    """`--on_policy_fraction F > 0`: on a seeded share F of the steps the student writes the replies (GKD)."""

    name = "on_policy"

    @staticmethod
    def declare(add) -> None:
        add("--on_policy_fraction", type=float_in(0, 1), default=0.0,
            help="share of optimizer steps whose replies the student writes itself (GKD's lambda; 1: fully "
                 "on-policy, 0: the dataset's replies)")

    @classmethod
    def selected(cls, values) -> bool:
        return values.get("on_policy_fraction", 0) > 0

    @classmethod
    def data_mode(cls, values) -> str:
        return "prompts" if values["on_policy_fraction"] >= 1 else "examples"  # every reply is the student's

    @classmethod
    def generates(cls, values) -> bool:
        return True

    @classmethod
    def check(cls, values, teacher) -> None:
        reason = None if teacher is None else why_not(teacher, SCORES_NEW_TEXT)
        if reason is not None:
            raise LmdistillError(f"--on_policy_fraction: {reason}; use an online --teacher for on-policy "
                                 "distillation (or --on_policy_fraction 0).")

    @classmethod
    def build(cls, plan, dataset: DatasetStream, trainer) -> BatchSource:
        return OnPolicyStream(dataset, plan.source.on_policy_fraction, plan.schedule.seed, trainer.generator.replies)
