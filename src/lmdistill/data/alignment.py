"""Alignment of two tokenizations of the same text (cross-tokenizer distillation, `--cross_tokenizer`).

Both models read the same text. A model's prediction at a position is its distribution over the token that starts
at the next character boundary; the two predictions are comparable where that boundary is a token start in both
tokenizations. `common_boundaries` pairs those positions by the tokens' character offsets in the same text; a
token whose predecessor runs past its start (a multi-byte character split into byte tokens, perhaps merged with
what precedes it) does not start at a boundary. Where one tokenizer's token covers several of the other's, only
the first of those is aligned (the "first position" rule); the others are counted as unaligned by the caller,
never dropped silently. `shared_vocabulary` finds the tokens that stand for the same bytes in both vocabularies
(GOLD's one-to-one part).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def token_boundaries(offsets: Sequence[tuple[int, int]]) -> dict[int, int]:
    """{offset: token index} of the tokens that start at a boundary: the previous token ends at or before their
    start (with character offsets, a byte-level token holding part of a multi-byte character runs past it)."""
    found: dict[int, int] = {}
    for k, (start, _end) in enumerate(offsets):
        if (k == 0 or offsets[k - 1][1] <= start) and start not in found:
            found[start] = k
    return found


def common_boundaries(student_offsets: Sequence[tuple[int, int]],
                      teacher_offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(i, j) for each student token i and teacher token j that start at the same boundary, given each token's
    (start, end) offsets (bytes or characters, the same unit on both sides) in the same text."""
    teacher = token_boundaries(teacher_offsets)
    return [(i, teacher[c]) for c, i in sorted(token_boundaries(student_offsets).items()) if c in teacher]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte -> the byte."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = list(visible), 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for (None when it has no exact byte form): byte-level BPE tokens through
    GPT-2's alphabet, added/special tokens as their text, others decoded alone when the text is whole (no
    U+FFFD from a partial UTF-8 sequence)."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
    inverse = _byte_decoder() if byte_level else {}
    added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    out: list[bytes | None] = []
    for i in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(i)
        if piece is None:
            out.append(None)
        elif byte_level and i not in added and all(ch in inverse for ch in piece):
            out.append(bytes(inverse[ch] for ch in piece))
        else:
            text = piece if i in added else tokenizer.decode([i], clean_up_tokenization_spaces=False)
            out.append(text.encode("utf-8") if text and "\ufffd" not in text else None)
    return out


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[Tensor, Tensor]:
    """Ids (student [M], teacher [M]) of the tokens that stand for the same bytes in both vocabularies (each byte
    string unique within its vocabulary); with one tokenizer on both sides, every token with a byte form."""

    def table(tokenizer) -> dict[bytes, int]:
        seen: dict[bytes, int] = {}
        duplicate: set[bytes] = set()
        for i, b in enumerate(token_bytes(tokenizer)):
            if b is None:
                continue
            if b in seen:
                duplicate.add(b)
            seen[b] = i
        return {b: i for b, i in seen.items() if b not in duplicate}

    s, t = table(student_tokenizer), table(teacher_tokenizer)
    common = sorted(set(s) & set(t), key=lambda x: s[x])
    return torch.tensor([s[x] for x in common], dtype=torch.long), torch.tensor([t[x] for x in common], dtype=torch.long)
