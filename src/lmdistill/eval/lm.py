"""Language-model metrics on held-out examples (CE, perplexity, bits/byte, KL to and agreement with a teacher).

One implementation serves `lmdistill eval` and evaluation during training; it lives beside the loop
(`lmdistill.train.evaluate`) so that training needs nothing from this layer above it.
"""

from lmdistill.train.evaluate import EVAL_CHUNK_TOKENS, evaluate_lm, shift_labels

__all__ = ["EVAL_CHUNK_TOKENS", "evaluate_lm", "shift_labels"]
