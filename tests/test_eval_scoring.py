"""Scoring of generated answers: Wilson intervals, normalization, answer extraction, Rouge-L (hand-computed)."""

import math

import pytest

from lmdistill.errors import LmdistillError
from lmdistill.eval.scoring import (extract_answer, lcs_length, mean_interval, normalize_answer, rouge_l, rouge_tokens,
                                    strip_think, wilson_interval)


@pytest.mark.parametrize("k, n, low, high", [
    # z = 1.96: center = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    (0, 10, 0.0, 0.277533),     # center = 0.192073/1.384146 = 0.138767 = half
    (5, 10, 0.236593, 0.763407),  # center 0.5, half = 1.415999 * sqrt(0.025 + 0.009604) = 0.263407
    (8, 10, 0.490162, 0.943318),  # center = 0.992073/1.384146 = 0.716740, half = 1.415999 * 0.159656
    (10, 10, 0.722467, 1.0),
    (1, 1, 0.206549, 1.0),      # center = 2.920729/4.841459 = 0.603275, half = 0.404829 * 0.979982
])
def test_wilson_interval_matches_hand_computation(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=2e-6)


def test_wilson_interval_edges_and_symmetry():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(3, 17)
    mirrored = wilson_interval(14, 17)
    assert (low, high) == pytest.approx((1 - mirrored[1], 1 - mirrored[0]))
    assert low < 3 / 17 < high


def test_mean_interval_hand_computed():
    # mean 0.4, sample std 0.2, half = 1.959964 * 0.2 / sqrt(3) = 0.226317
    assert mean_interval([0.2, 0.4, 0.6]) == pytest.approx((0.4, 0.173683, 0.626317), abs=1e-6)
    assert mean_interval([0.0, 1.0]) == pytest.approx((0.5, 0.0, 1.0))  # clipped to the score's bounds
    assert mean_interval([0.7]) == (0.7, 0.0, 1.0)  # one value: no interval estimate


@pytest.mark.parametrize("raw, normalized", [
    ("４２", "42"),                      # full-width digits
    ("Ｈｅｌｌｏ　Ｗｏｒｌｄ", "hello world"),  # full-width letters and ideographic space
    ("  The ANSWER ", "the answer"),
    ("a \n\t b", "a b"),
    ("42.", "42"), ("42。", "42"), ("42！", "42"), ("42!!", "42"), ("42 .", "42"),
    ("3.14", "3.14"),                    # only trailing punctuation goes
    ("Straße", "strasse"),               # casefold, not lower
    ("", ""),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_normalization_makes_equivalent_answers_equal():
    assert normalize_answer("ＹＥＳ。") == normalize_answer(" yes ")
    assert normalize_answer("42") != normalize_answer("420")


GSM8K_REFERENCE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_extract_answer_gsm8k():
    assert extract_answer(GSM8K_REFERENCE, r"####\s*(\S+)") == "72"
    assert extract_answer("First #### 3, then I fixed it.\n#### 42", r"####\s*(\S+)") == "42"  # the last match
    assert extract_answer("#### 42", r"####\s*\S+") == "#### 42"  # no group: the whole match
    assert extract_answer("no marker here", r"####\s*(\S+)") is None
    assert extract_answer("unchanged text", None) == "unchanged text"


def test_invalid_regex_is_a_user_error():
    with pytest.raises(LmdistillError, match="answer_regex.*not a valid regular expression"):
        extract_answer("x", "(unclosed")


@pytest.mark.parametrize("text, answer", [
    ("<think>\nlet me see, 6*7\n</think>\n\n42", "42"),
    ("<think>\n\n</think>\n\n42", "42"),
    ("reasoning without the opening tag</think>42", "42"),  # template opened the think block in the prompt
    ("<think> still thinking when the tokens ran out", ""),
    ("  42  ", "42"),
])
def test_strip_think(text, answer):
    assert strip_think(text) == answer


def test_rouge_tokens_words_and_cjk_characters():
    assert rouge_tokens("Hello, World!") == ["hello", "world"]
    assert rouge_tokens("我爱北京。") == ["我", "爱", "北", "京"]
    assert rouge_tokens("用Python３写") == ["用", "python3", "写"]
    assert rouge_tokens("  ...  ") == []


def test_lcs_length_hand_examples():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS 15.4: BCBA
    assert lcs_length("BDCABA", "ABCBDAB") == 4
    assert lcs_length("abc", "abc") == 3
    assert lcs_length("abc", "") == 0
    assert lcs_length("abc", "xyz") == 0


@pytest.mark.parametrize("prediction, reference, expected", [
    # Lin (2004), ROUGE-L examples: reference "police killed the gunman"
    ("police kill the gunman", "police killed the gunman", 0.75),  # LCS 3 (police the gunman): P = R = 3/4
    ("the gunman kill police", "police killed the gunman", 0.5),  # LCS 2 (the gunman): P = R = 2/4
    ("the cat sat", "the cat sat down", 6 / 7),  # LCS 3: P = 1, R = 3/4, F = 2 * 0.75 / 1.75
    ("The cat, sat!", "the CAT sat", 1.0),  # case and punctuation do not count
    ("我喜欢猫", "我喜欢狗和猫", 0.8),  # LCS 4: P = 1, R = 4/6, F = (4/3) / (5/3)
    ("", "anything", 0.0),
    ("something", "", 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)
    assert math.isclose(rouge_l(reference, prediction), expected)  # F1 is symmetric
