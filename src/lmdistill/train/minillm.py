"""MiniLLM (Gu et al., ICLR 2024, "MiniLLM: Knowledge Distillation of Large Language Models"): the sequence-level
reverse KL KL(q_student || p_teacher), minimized by policy gradient on sampled replies.

    lmdistill distill --method minillm --teacher_mix_alpha 0.2 --lm_coef 1.0 ...

Every optimizer step, each micro-batch's prompts (the conversation up to its last assistant turn) are completed by
sampling from alpha * p + (1 - alpha) * q (teacher-mixed sampling; both models through their KV caches,
`lmdistill.models.decode.decode_mixed`), which also records each sampled token's log-probability under q, p and
the mixture. The sampled batch is trained with the single-step reverse KL (exact over the vocabulary, in the fused
loss) and the policy-gradient term on the length-normalized future reward, both weighted per token by the clipped
importance weight (`lmdistill.losses.minillm`). With `--lm_coef C > 0` the dataset replies of the same records
are trained with C * CE (the paper's L_PT, here on the distillation data). The two token groups are normalized
separately, each by its global token count, as the paper's two averages are.

Simplifications, stated in the README: one gradient step per sampled batch (no PPO epochs over stored rollouts,
so PPO's ratio is 1 and its clip reduces to clipping the importance weight, done directly), no reward whitening
or baseline, and the LM term on the distillation data rather than a separate pre-training corpus.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from lmdistill.config import float_in
from lmdistill.data import IGNORE_INDEX, pad_batch
from lmdistill.data.batch import Batch
from lmdistill.errors import LmdistillError
from lmdistill.losses.minillm import minillm_weights
from lmdistill.teachers.registry import STEPS_TOKENS, why_not
from lmdistill.train.batches import BatchSource, DatasetStream, SourceKind, register_source
from lmdistill.train.on_policy import last_prompt


class MixedReply(NamedTuple):
    """A sampled reply: tokens before the stop token, the stop token (None when cut at max_new_tokens) and the
    log-probabilities of every sampled token (the reply's, then the stop token's) under the student, the teacher
    and the sampling mixture."""

    token_ids: list[int]
    stop_token: int | None
    logq: list[float]
    logp: list[float]
    logmix: list[float]

    @property
    def finished(self) -> bool:
        return self.stop_token is not None

    @property
    def completion(self) -> list[int]:
        return self.token_ids + ([self.stop_token] if self.stop_token is not None else [])


@torch.no_grad()
def sample_mixed(student, teacher, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, alpha: float,
                 device) -> list[MixedReply]:
    """Replies to token-id prompts sampled from alpha * teacher + (1 - alpha) * student (one batch; the student in
    eval mode meanwhile, its training mode restored)."""
    from lmdistill.models.decode import Stepper, decode_mixed
    from lmdistill.models.generation import left_pad, stop_token_ids

    stops = stop_token_ids(tokenizer, student)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad))
    was_training = student.training
    student.eval()
    try:
        out = decode_mixed(Stepper(student), teacher.stepper(), input_ids, attention_mask, max_new_tokens, stops, pad,
                           alpha, teacher.vocab_size)
    finally:
        student.train(was_training)
    replies, stop_set = [], set(stops)
    for row, (tokens, lq, lp, lm) in enumerate(zip(out.tokens.tolist(), out.logq.tolist(), out.logp.tolist(),
                                                   out.logmix.tolist())):
        end = next((k for k, t in enumerate(tokens) if t in stop_set), None)
        n = len(tokens) if end is None else end + 1
        replies.append(MixedReply(tokens[:n] if end is None else tokens[:end], None if end is None else tokens[end],
                                  lq[:n], lp[:n], lm[:n]))
    return replies


class MiniLLMStream(BatchSource):
    """Per dataset micro-batch: the sampled batch (group "minillm", with per-token `kd_weights` and `ce_weights`)
    and, when lm_coef > 0, the dataset batch itself (group "lm", trained with lm_coef x CE)."""

    def __init__(self, dataset: DatasetStream, sample: Callable[[list], list[MixedReply]], lm_coef: float,
                 clip: float | None = 0.2):
        self.dataset, self.sample, self.lm_coef, self.clip = dataset, sample, lm_coef, clip
        self.groups = ("minillm", "lm") if lm_coef > 0 else ("minillm",)
        missing = next((i for i, ex in enumerate(dataset.examples) if not last_prompt(ex)), None)
        if missing is not None:
            raise LmdistillError(f"--method minillm: example {missing + 1} of the training data has no prompt (plain "
                                 "text, every token trained); MiniLLM samples replies to prompts: give conversations "
                                 "or prompt/completion records.")

    def batches(self, step: int) -> list[Batch]:
        out, stats, generated, cut, n = [], [], 0, 0, 0
        for batch in self.dataset.batches(step):
            examples = [self.dataset.examples[i] for i in batch.example_index]
            prompts = [last_prompt(ex) for ex in examples]
            replies = self.sample(prompts)
            sampled = [{"input_ids": p + r.completion, "labels": [IGNORE_INDEX] * len(p) + r.completion}
                       for p, r in zip(prompts, replies)]
            weights = minillm_weights(*_token_table(replies), clip=self.clip)
            out.append(Batch.of(pad_batch(sampled, self.dataset.pad), self.dataset.device, batch.example_index,
                                group="minillm", kd_weights=weights.kd, ce_weights=weights.pg))
            if self.lm_coef > 0:
                out.append(batch.with_(group="lm"))
            stats.append(weights.stats)
            generated += sum(len(r.token_ids) for r in replies)
            cut += sum(not r.finished for r in replies)
            n += len(replies)
        mean = lambda key: sum(s[key] for s in stats) / max(len(stats), 1)  # noqa: E731
        self.last_stats = {"on_policy": True, "generated_tokens": generated,
                           "mean_completion_tokens": generated / max(n, 1), "cut_share": cut / max(n, 1),
                           "reward": mean("reward"), "importance_weight": mean("importance_weight"),
                           "clipped_share": mean("clipped_share")}
        return out


def _token_table(replies: list[MixedReply]) -> tuple[torch.Tensor, ...]:
    """logq, logp, logmix [B, L] and the completion mask [B, L] of the replies (their tokens left-aligned)."""
    length = max(len(r.logq) for r in replies)
    table = torch.zeros(4, len(replies), length, dtype=torch.float64)
    for row, r in enumerate(replies):
        k = len(r.logq)
        table[0, row, :k], table[1, row, :k], table[2, row, :k] = (torch.tensor(x, dtype=torch.float64)
                                                                 for x in (r.logq, r.logp, r.logmix))
        table[3, row, :k] = 1
    return table[0], table[1], table[2], table[3].bool()


@register_source
class MiniLLMSource(SourceKind):
    """`--method minillm`: every step's replies sampled from the teacher-student mixture (and, with --lm_coef, the
    dataset's replies as a second token group)."""

    name, objective = "minillm", "minillm"

    @staticmethod
    def declare(add) -> None:
        add("--teacher_mix_alpha", type=float_in(0, 1), default=0.2,
            help="--method minillm: replies are sampled from alpha*teacher + (1-alpha)*student (0: the student "
                 "alone)")
        add("--lm_coef", type=float_in(0, None), default=1.0,
            help="--method minillm: weight of the CE loss on the dataset's own replies (the paper's L_PT; 0: none)")
        add("--minillm_clip", type=float_in(0, 1, hi_open=True), default=0.2,
            help="--method minillm: importance weights q/(alpha*p+(1-alpha)*q) are clipped to [1-EPS, 1+EPS]")

    @classmethod
    def selected(cls, values) -> bool:
        return values.get("method") == "minillm"

    @classmethod
    def data_mode(cls, values) -> str:
        return "prompts" if values["lm_coef"] == 0 else "examples"

    @classmethod
    def generates(cls, values) -> bool:
        return True

    @classmethod
    def check(cls, values, teacher) -> None:
        """MiniLLM's objective is fixed (sequence-level reverse KL at T = 1, sampled from the teacher-student mixture
        every step): options of the token-level objective that would change it are refused, not ignored."""
        from lmdistill.losses.divergences import canonical_divergence

        reason = None if teacher is None else why_not(teacher, STEPS_TOKENS)
        if reason is not None:
            raise LmdistillError(f"--method minillm: {reason}; use an online --teacher.")
        v = values
        conflicts = [
            (v["on_policy_fraction"] > 0, f"--on_policy_fraction {v['on_policy_fraction']:g}",
             "MiniLLM samples replies on every step"),
            (canonical_divergence(v["divergence"]) not in ("forward_kl", "reverse_kl"), f"--divergence {v['divergence']}",
             "MiniLLM minimizes the reverse KL"),
            (v["temperature"] != 1.0 or v["temperature_end"] is not None, "--temperature/--temperature_end",
             "MiniLLM's reverse KL is at temperature 1"),
            (v["alpha"] != 0, f"--alpha {v['alpha']:g}", "the CE on the dataset replies is --lm_coef"),
            (v["top_k"] is not None, f"--top_k {v['top_k']}", "the single-step reverse KL is exact over the vocabulary"),
            (v["generation_temperature"] != 1.0 or v["generation_top_p"] != 1.0,
             "--generation_temperature/--generation_top_p",
             "MiniLLM samples from the teacher-student mixture at temperature 1 (its importance weights assume it)"),
        ]
        for bad, flag, why in conflicts:
            if bad:
                raise LmdistillError(f"{flag}: not used by --method minillm ({why}); drop it, or use --method kd.")
        if v["generation_backend"] == "vllm":
            raise LmdistillError("--generation_backend vllm: MiniLLM samples from the teacher-student mixture token by "
                                 "token, which vLLM cannot; use --generation_backend auto.")

    @classmethod
    def build(cls, plan, dataset: DatasetStream, trainer) -> BatchSource:
        o, gen = plan.objective, plan.source.generation

        def sample(prompts):
            return sample_mixed(trainer.unwrapped(), trainer.teacher, trainer.tokenizer, prompts, gen.max_new_tokens,
                                o.teacher_mix_alpha, trainer.device)

        return MiniLLMStream(dataset, sample, o.lm_coef, o.minillm_clip)
