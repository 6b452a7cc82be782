"""Evaluation: language-model metrics (perplexity, bits/byte, agreement with a teacher) and task accuracy."""

from lmdistill.eval.lm import evaluate_lm, shift_labels

__all__ = ["evaluate_lm", "shift_labels"]
