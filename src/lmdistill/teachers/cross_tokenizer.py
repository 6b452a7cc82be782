"""A teacher with its own tokenizer (`--cross_tokenizer uld|gold`): it reads each example in its own rendering
(`batch["teacher_input_ids"]`, made by `lmdistill.data.cross_tokenizer`) and gives its final hidden states at the
positions aligned with the student's (`batch["teacher_rows"]`); the loss projects them one chunk at a time
(`lmdistill.losses.cross_tokenizer.cross_tokenizer_loss_parts`). It cannot score the student's own tokens, so eval
reports the student's CE and bits per byte, not a KL to it."""

from __future__ import annotations

import torch

from lmdistill.errors import LmdistillError
from lmdistill.models import forward_hidden, lm_head_of
from lmdistill.models.hidden import full_weights
from lmdistill.teachers.online import OnlineTeacher


class CrossTokenizerTeacher(OnlineTeacher):
    offline = False

    def __init__(self, model: torch.nn.Module, vocab_size: int, name: str = "teacher"):
        super().__init__(model, vocab_size, name)
        head = lm_head_of(model)
        if head.logit_scale != 1.0 or head.softcap:
            raise LmdistillError(f"{name} scales or softcaps its logits; the cross-tokenizer losses do not support "
                                 "that yet (the token-level losses do).")

    def score(self, batch: dict):
        """(hidden rows [n, Ht] at batch["teacher_rows"], lm_head weight, bias) under no grad."""
        with torch.no_grad():
            hidden = forward_hidden(self.model, batch["teacher_input_ids"], batch["teacher_attention_mask"]).hidden
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["teacher_rows"])
            weight, bias = full_weights(lm_head_of(self.model))
        return rows, weight, bias

    def for_eval(self, examples):
        return None  # its distribution is over another vocabulary: no KL or agreement to report

    def stepper(self):
        return None  # it cannot continue the student's tokens
