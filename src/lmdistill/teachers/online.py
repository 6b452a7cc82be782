"""An online teacher: a frozen HF causal LM run on each micro-batch; its final hidden states and lm_head are
handed to the loss, which projects them to logits one token chunk at a time (no `[batch, seq, vocab]` logits)."""

from __future__ import annotations

import torch

from lmdistill.errors import LmdistillError
from lmdistill.losses.scores import ProjectedScores
from lmdistill.models import forward_hidden, lm_head_of
from lmdistill.models.hidden import full_weights
from lmdistill.teachers.base import Teacher


class OnlineTeacher(Teacher):
    """`model` frozen (eval mode, no grad); `vocab_size` real tokens compared (its lm_head may be padded)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, name: str = "teacher"):
        head = lm_head_of(model)
        rows = head.weight.shape[0]
        if vocab_size is not None and vocab_size > rows:
            raise LmdistillError(f"{name}: expected at least {vocab_size} output rows (the vocabulary), found {rows}.")
        model.eval()
        model.requires_grad_(False)
        self.model, self.name, self.vocab_size = model, name, vocab_size or rows
        self.keep_layers: list[int] = []  # decoder layers whose outputs score() also returns (feature distillation)

    @property
    def rows(self) -> int:
        return lm_head_of(self.model).weight.shape[0]

    def score(self, batch: dict) -> ProjectedScores:
        with torch.no_grad():
            out = forward_hidden(self.model, batch["input_ids"], batch["attention_mask"], layers=self.keep_layers)
            head = lm_head_of(self.model)
            weight, bias = full_weights(head)
        # Cohere/Granite scale and Gemma 2/3 softcap their logits: the loss applies the same, one chunk at a time
        scores = ProjectedScores(out.hidden, weight, bias, self.vocab_size, (head.logit_scale, head.softcap))
        scores.layers = out.layers  # {layer: [B, T, H]} of keep_layers, else None
        return scores

    def stepper(self):
        from lmdistill.models.decode import Stepper

        return Stepper(self.model)

    def prepare(self, prepare_model) -> None:
        self.model = prepare_model(self.model)
        self.model.eval()
