"""Scoring generated answers: normalization, answer extraction, Rouge-L, confidence intervals. Pure Python.

    normalize_answer(" ４２。 ")                        # '42'  (NFKC, casefold, whitespace, trailing .。!！)
    extract_answer("so...\\n#### 42", r"####\\s*(\\S+)")  # '42'  (last match, first capture group)
    rouge_l("the cat sat", "the cat sat down")         # 0.857 (LCS 3: P 3/3, R 3/4)
    wilson_interval(5, 10)                             # (0.2366, 0.7634)

Rouge-L is MiniLLM's metric (the LCS F-measure of `rouge_score`, as in Super-NaturalInstructions), with a
tokenization that also works for Chinese: text is NFKC-normalized and casefolded, punctuation is dropped,
runs of letters/digits are words, and every CJK character is a word of its own. No stemming (rouge_score's
`use_stemmer=True` maps "cats" to "cat"; here they differ), so English scores can be slightly lower.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Sequence

from lmdistill.errors import LmdistillError

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
TRAILING_PUNCTUATION = ".。!！"
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")
_WORD = re.compile(r"[^\W_]+")
_SPACES = re.compile(r"\s+")


def strip_think(text: str) -> str:
    """The reply without its reasoning: what follows the last `</think>`, or what precedes an unclosed `<think>`."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:  # generation stopped inside the reasoning: no answer yet
        text = text.split("<think>", 1)[0]
    return text.strip()


def normalize_answer(text: str) -> str:
    """NFKC (full-width -> half-width), casefold, collapse whitespace, strip, drop trailing `.。!！`."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return text.rstrip(TRAILING_PUNCTUATION).rstrip()


def compile_answer_regex(pattern: str | re.Pattern | None) -> re.Pattern | None:
    """`pattern` compiled; an invalid one is a LmdistillError naming the option."""
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LmdistillError(f"answer_regex / --answer_regex: {pattern!r} is not a valid regular expression "
                             f"({exc}).") from None


def extract_answer(text: str, pattern: str | re.Pattern | None) -> str | None:
    """The final answer in `text`: the last match of `pattern` (its first capture group if it has one).

    None when nothing matches; `text` itself when there is no pattern. The last match is taken because models
    often restate intermediate results in the answer's format before the final one.
    """
    regex = compile_answer_regex(pattern)
    if regex is None:
        return text
    matches = list(regex.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if regex.groups else last.group(0)


def rouge_tokens(text: str) -> list[str]:
    """Words for Rouge-L: casefolded NFKC letter/digit runs, each CJK character a word of its own."""
    text = _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text).casefold())
    return _WORD.findall(text)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of `a` and `b` (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 of `prediction` against `reference` (0.0 when either has no word)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: Sequence[float], low: float = 0.0, high: float = 1.0,
                  z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal-approximation 95% interval of the mean of scores bounded by [low, high].

    Uses the sample standard deviation and is clipped to the bounds; fewer than 2 values give (low, high).
    """
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n < 2:
        return mean, low, high
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * std / math.sqrt(n)
    return mean, max(low, mean - half), min(high, mean + half)
