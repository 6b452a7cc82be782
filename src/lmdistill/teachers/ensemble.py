"""Teacher ensembles (Timiryasov & Tastet 2023, "Baby Llama: knowledge distillation from an ensemble of
teachers"): several teachers act as one.

    lmdistill distill --teacher A --teacher B [--teacher_weights 0.5,0.5] [--ensemble logits|probs] ...

The ensemble is a teacher whose T=1 logits, at every trained position, are
- `logits`: the weighted mean of the members' logits, sum_i w_i z_i (BabyLlama's formula), or
- `probs`:  the log of the weighted mixture of their distributions, log sum_i w_i softmax(z_i);
temperature, top_k and every divergence then apply to it as to any single teacher (so under `probs` the
temperature softens the mixture). Weights are positive and normalized to sum to 1.

Members are scored one after the other on each micro-batch, and the loss reads the ensemble one token chunk at a
time: at most one extra `[chunk, vocab]` buffer exists besides each member's own chunk. A member that is exact
only within a top-k (a cache with k < vocabulary) cannot be combined exactly -- the ids it did not keep have no
logits -- so such members are refused (cache the whole vocabulary, `cache-teacher --top_k V`, to ensemble caches).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmdistill.config import POSITIVE_WEIGHTS
from lmdistill.errors import LmdistillError
from lmdistill.losses.scores import TeacherScores
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.registry import (FULL_VOCABULARY, HIDDEN_STATES, SCORES_NEW_TEXT, STEPS_TOKENS, BuildContext,
                                         TeacherKind, TeacherSpec, members_have, register_teacher_kind, why_not)

MODES = ("logits", "probs")


class EnsembleScores(TeacherScores):
    def __init__(self, members: list[TeacherScores], weights: list[float], mode: str):
        self.members, self.weights, self.mode = members, weights, mode
        self.vocab_size = members[0].vocab_size
        self._buf: Tensor | None = None

    def block(self, start: int, rows: Tensor, out: Tensor) -> Tensor:
        if self._buf is None or self._buf.shape[0] < out.shape[0] or self._buf.dtype != out.dtype:
            self._buf = torch.empty_like(out)
        tmp = self._buf[: out.shape[0]]
        for i, (member, w) in enumerate(zip(self.members, self.weights)):
            z = member.block(start, rows, out if i == 0 else tmp)
            if self.mode == "logits":
                out.mul_(w) if i == 0 else out.add_(z, alpha=w)
            else:
                z.sub_(torch.logsumexp(z, -1, keepdim=True)).add_(math.log(w))  # log(w_i p_i)
                if i:
                    torch.logaddexp(out, z, out=out)
        return out


class EnsembleStepper:
    """The ensemble's next-token logits, one token at a time (`Teacher.stepper`): its members' steppers combined
    as `EnsembleScores` combines their scores."""

    def __init__(self, steppers: list, weights: list[float], mode: str, vocab_size: int):
        self.steppers, self.weights, self.mode, self.vocab_size = steppers, weights, mode, vocab_size
        self.models = [m for s in steppers for m in s.models]

    def _combine(self, logits: list[Tensor]) -> Tensor:
        z = [x[:, : self.vocab_size].float() for x in logits]
        if self.mode == "logits":
            return sum(w * x for w, x in zip(self.weights, z))
        return torch.logsumexp(torch.stack([torch.log_softmax(x, -1) + math.log(w) for w, x in zip(self.weights, z)]), 0)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._combine([s.prefill(input_ids, attention_mask) for s in self.steppers])

    def step(self, tokens: Tensor) -> Tensor:
        return self._combine([s.step(tokens) for s in self.steppers])


class EnsembleTeacher(Teacher):
    def __init__(self, members: list[Teacher], weights: list[float] | None = None, mode: str = "logits"):
        if len(members) < 1:
            raise LmdistillError("an ensemble needs at least one teacher.")
        if mode not in MODES:
            raise LmdistillError(f"--ensemble: expected one of {', '.join(MODES)}, found '{mode}'.")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise LmdistillError(f"--teacher_weights: expected {len(members)} positive numbers (one per teacher), "
                                 f"found {weights}.")
        sizes = {m.vocab_size for m in members}
        if len(sizes) != 1:
            raise LmdistillError(f"the ensemble's teachers compare different vocabularies ({sorted(sizes)} tokens); "
                                 "they must share the student's tokenizer.")
        for m in members:
            if m.stored_k is not None and m.stored_k < m.vocab_size:
                raise LmdistillError(f"{m.name} holds only its top {m.stored_k} tokens per position: an ensemble needs every "
                                     "logit of each member (cache the whole vocabulary with `cache-teacher --top_k "
                                     f"{m.vocab_size}`).")
        total = sum(weights)
        self._members, self.weights, self.mode = members, [w / total for w in weights], mode
        self.vocab_size, self.name = members[0].vocab_size, "ensemble"
        self.offline = any(m.offline for m in members)

    def score(self, batch) -> EnsembleScores:
        return EnsembleScores([m.score(batch) for m in self._members], self.weights, self.mode)

    def members(self) -> list[Teacher]:
        return list(self._members)

    def check_examples(self, examples) -> None:
        for m in self._members:
            m.check_examples(examples)

    def for_eval(self, examples) -> Teacher | None:
        members = [m.for_eval(examples) for m in self._members]
        if any(m is None for m in members):
            return None
        ensemble = EnsembleTeacher(members, self.weights, self.mode)
        ensemble.name = self.name
        return ensemble

    def stepper(self):
        steppers = [m.stepper() for m in self._members]
        return None if any(s is None for s in steppers) else EnsembleStepper(steppers, self.weights, self.mode,
                                                                             self.vocab_size)

    def prepare(self, prepare_model) -> None:
        for m in self._members:
            m.prepare(prepare_model)

    def describe(self) -> str:
        parts = ", ".join(f"{m.name} x {w:.3g}" for m, w in zip(self._members, self.weights))
        return f"ensemble of {len(self._members)} ({self.mode}): {parts}"


@register_teacher_kind
class EnsembleKind(TeacherKind):
    """Several teachers (`--teacher` and `--teacher_cache`, any mix) as one: `--teacher_weights`, `--ensemble`."""

    name, wraps = "ensemble", True
    lacks = {HIDDEN_STATES: "the hidden states of which teacher? Feature distillation takes one --teacher "
                            "(ensembles distill logits only)"}

    @staticmethod
    def declare(add) -> None:
        add("--teacher_weights", type=POSITIVE_WEIGHTS, default=None, metavar="W1,W2,...",
            help="ensemble weights, one per teacher (--teacher ones first, then --teacher_cache ones), normalized to "
                 "sum to 1 (default: equal)")
        add("--ensemble", default="logits", choices=list(MODES),
            help="how several teachers combine: logits = weighted mean of their logits (BabyLlama), probs = weighted "
                 "mixture of their distributions")

    @classmethod
    def wrap(cls, specs: list[TeacherSpec], values) -> list[TeacherSpec]:
        weights = values["teacher_weights"]
        if weights is not None and len(weights) != len(specs):
            raise LmdistillError(f"--teacher_weights: expected {len(specs)} weights (one per teacher: --teacher ones "
                                 f"first, then --teacher_cache ones), found {len(weights)}.")
        refs = [s.ref for s in specs]
        repeated = sorted({r for r in refs if refs.count(r) > 1})
        if repeated:
            raise LmdistillError(f"teacher '{repeated[0]}' is given more than once; give each teacher once and weight "
                                 "it with --teacher_weights.")
        if len(specs) < 2:
            return specs
        settings = (("weights", None if weights is None else tuple(weights)), ("mode", values["ensemble"]))
        return [TeacherSpec(cls.name, members=tuple(specs), settings=settings)]

    @classmethod
    def capabilities_for(cls, spec: TeacherSpec) -> frozenset[str]:
        return frozenset().union(*(members_have(spec, c) for c in (SCORES_NEW_TEXT, FULL_VOCABULARY, STEPS_TOKENS)))

    @classmethod
    def check(cls, spec: TeacherSpec, values) -> None:
        reason = why_not(spec, FULL_VOCABULARY)
        if reason is not None:
            raise LmdistillError(reason)

    @classmethod
    def build(cls, spec: TeacherSpec, ctx: BuildContext) -> EnsembleTeacher:
        weights = spec.get("weights")
        ensemble = EnsembleTeacher(ctx.members, None if weights is None else list(weights), spec.get("mode"))
        if ctx.is_main:
            print(ensemble.describe())
        return ensemble
