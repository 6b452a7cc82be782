"""Examples for cross-tokenizer distillation: each conversation rendered twice, with the student's tokenizer and
chat template (the training sequence, as `load_examples` makes it) and with the teacher's own (what the teacher
reads), plus the pairs of positions where the two predict the same next piece of text.

For every trained assistant turn, the reply's text (its `content`) is found in both renderings; positions are
aligned at the byte boundaries inside the reply (the tokens' own bytes; character offsets for tokenizers whose
tokens do not spell the text byte for byte) -- and at its end, where each model predicts its own
end-of-turn token -- at which both tokenizations start a token (`lmdistill.losses.cross_tokenizer.
common_boundaries`): the student position predicting a token that starts at boundary c is paired with the teacher
position predicting the teacher's token that starts at c. Trained tokens that start elsewhere (inside a token of
the other tokenizer, inside a multi-byte character, in a think block or template text around the reply) are
unaligned: they still get the hard-label CE (alpha), not the teacher's signal, and are counted
(`CrossStats`), never dropped silently. A plain-text document is one example, every token trained, aligned over
its whole text and at its end (both predict their EOS).

    examples = load_cross_examples("train.jsonl", student_tokenizer, teacher_tokenizer, max_seq_len=512)
    examples[0]["teacher_ids"], examples[0]["pairs"]      # [(student row, teacher row), ...]
    print(examples.stats.summary())
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmdistill.data.formats import normalize_format
from lmdistill.data.loader import iter_parsed
from lmdistill.data.stats import DataStats, Examples
from lmdistill.data.render import IGNORE_INDEX, _check_messages, _locate_turn, _tokenize_with_spans
from lmdistill.errors import LmdistillError
from lmdistill.data.alignment import common_boundaries, token_boundaries, token_bytes


@dataclass
class CrossStats(DataStats):
    aligned: int = 0  # trained student tokens whose prediction has a teacher counterpart

    def summary(self) -> str:
        share = 100 * self.aligned / max(self.trained_tokens, 1)
        return (f"{super().summary()} Cross-tokenizer alignment: {self.aligned:,} of {self.trained_tokens:,} trained "
                f"tokens ({share:.1f}%) have a teacher position at the same text boundary; the other "
                f"{self.trained_tokens - self.aligned:,} get no teacher signal.")


_BYTES: dict[int, list] = {}


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and their (start, end) offsets in the UTF-8 bytes of `text`: from the tokens' own bytes when they
    spell the text exactly (byte-level BPE: a multi-byte character split into byte tokens gets a boundary at each
    split, which both tokenizers may share), else from the character offsets (boundaries at characters only)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    table = _BYTES.setdefault(id(tokenizer), token_bytes(tokenizer))
    pieces = [table[i] if i < len(table) else None for i in ids]
    if all(p is not None for p in pieces) and b"".join(pieces) == text.encode("utf-8"):
        out, position = [], 0
        for p in pieces:
            out.append((position, position + len(p)))
            position += len(p)
        return ids, out
    to_byte = _char_to_byte(text)
    return ids, [(to_byte[a], to_byte[b]) for a, b in enc["offset_mapping"]]


def _char_to_byte(text: str) -> list[int]:
    """Byte offset of each character index of `text` (and of its end)."""
    out, position = [0], 0
    for ch in text:
        position += len(ch.encode("utf-8"))
        out.append(position)
    return out


def render_pair(student_tokenizer, teacher_tokenizer, messages) -> list[dict]:
    """The conversation's training sequences (as `render_conversation_examples` makes them for the student), each
    with `teacher_ids` (the same turns rendered for the teacher) and `pairs` [(student row, teacher row)]: the
    student position (before the shift: it predicts token row + 1) and the teacher position predicting the same
    boundary's token."""
    messages = _check_messages(messages, need_assistant=True)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    s_turns = {i: _locate_turn(student_tokenizer, messages, i) for i in replies}
    t_turns = {i: _locate_turn(teacher_tokenizer, messages, i) for i in replies}
    pending, out = list(replies), []
    while pending:
        last = pending[-1]
        s_text, t_text = s_turns[last][0], t_turns[last][0]
        kept = [i for i in pending if s_text.startswith(s_turns[i][0])]
        ids, labels = _tokenize_with_spans(student_tokenizer, s_text, [s_turns[i][1:] for i in kept])
        s_ids, s_offsets = _offsets(student_tokenizer, s_text)
        t_ids, t_offsets = _offsets(teacher_tokenizer, t_text)
        if s_ids != ids:
            raise LmdistillError("the student tokenizer tokenized the same text twice differently.")
        pairs = []
        for i in kept:
            content = messages[i]["content"]
            if not content or not t_text.startswith(t_turns[i][0]):
                continue  # the teacher's template renders this turn differently once later turns follow
            cs, ct = s_text.find(content, s_turns[i][1]), t_text.find(content, t_turns[i][1])
            if not (s_turns[i][1] <= cs < s_turns[i][2]) or not (t_turns[i][1] <= ct < t_turns[i][2]):
                continue
            # in bytes from here on (the offsets are byte offsets)
            cs, ct, end = len(s_text[:cs].encode("utf-8")), len(t_text[:ct].encode("utf-8")), len(content.encode("utf-8"))
            s_sel = [k for k, (c, _) in enumerate(s_offsets) if cs <= c <= cs + end]
            t_sel = [k for k, (c, _) in enumerate(t_offsets) if ct <= c <= ct + end]
            # offsets relative to the reply; a token's predecessor (even outside the reply) decides its boundary
            rel = lambda offs, sel, base: [(offs[k][0] - base, offs[k][1] - base) for k in sel]  # noqa: E731
            s_bound = token_boundaries(s_offsets)
            t_bound = token_boundaries(t_offsets)
            for a, b in common_boundaries(rel(s_offsets, s_sel, cs), rel(t_offsets, t_sel, ct)):
                si, tj = s_sel[a], t_sel[b]
                if s_bound.get(s_offsets[si][0]) != si or t_bound.get(t_offsets[tj][0]) != tj:
                    continue  # the token before it (outside the selection) runs into it
                if si >= 1 and tj >= 1 and labels[si] != IGNORE_INDEX:
                    pairs.append((si - 1, tj - 1))
        out.append({"input_ids": ids, "labels": labels, "teacher_ids": t_ids, "pairs": pairs})
        pending = [i for i in pending if i not in kept]
    return out[::-1]


def document_pair(student_tokenizer, teacher_tokenizer, text: str) -> dict:
    """A plain-text document, every token trained and followed by each tokenizer's EOS, aligned over the whole
    text (and at its end, where both predict their EOS)."""
    s_ids, s_offsets = _offsets(student_tokenizer, text)
    t_ids, t_offsets = _offsets(teacher_tokenizer, text)
    for ids, offsets, tok in ((s_ids, s_offsets, student_tokenizer), (t_ids, t_offsets, teacher_tokenizer)):
        if tok.eos_token_id is None:
            raise LmdistillError("a tokenizer has no eos token, needed to end plain-text documents.")
        ids.append(tok.eos_token_id)
        offsets.append((len(text.encode("utf-8")),) * 2)
    pairs = [(i - 1, j - 1) for i, j in common_boundaries(s_offsets, t_offsets) if i >= 1 and j >= 1]
    return {"input_ids": s_ids, "labels": list(s_ids), "teacher_ids": t_ids, "pairs": pairs}


def load_cross_examples(path: str | Path, student_tokenizer, teacher_tokenizer, max_seq_len: int = 512,
                        data_format: str = "auto", skip_bad_records: bool = False) -> Examples:
    """`load_examples` with each example also holding `teacher_ids` and `pairs` (truncated with the student's
    sequence; the teacher's ids are kept up to the last position a pair needs). Plain-text documents are one
    example each (cut at `max_seq_len` and counted), not packed into blocks as `load_examples` does: a block would
    cut the text at a student token, which the teacher's tokenization does not share."""
    if max_seq_len < 2:
        raise LmdistillError(f"max_seq_len must be at least 2, found {max_seq_len}.")
    stats = CrossStats(source=str(path), data_format=normalize_format(data_format), max_seq_len=max_seq_len)
    examples = Examples(stats=stats)

    def convert(parsed) -> list[dict]:
        if isinstance(parsed, str):
            return [document_pair(student_tokenizer, teacher_tokenizer, parsed)]
        sequences = render_pair(student_tokenizer, teacher_tokenizer, parsed)
        stats.split_sequences += len(sequences) - 1
        return sequences

    for sequences in iter_parsed(path, stats, skip_bad_records, convert):
        for ex in sequences:
            ids, labels = ex["input_ids"], ex["labels"]
            if len(ids) > max_seq_len:
                stats.truncated += 1
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            pairs = [(s, t) for s, t in ex["pairs"] if s + 1 < len(ids)]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats.dropped_no_trained += 1
                continue
            keep = max((t for _, t in pairs), default=0) + 1
            examples.append({"input_ids": ids, "labels": labels, "teacher_ids": ex["teacher_ids"][:keep],
                             "pairs": pairs})
            stats.examples += 1
            stats.tokens += len(ids)
            stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
            stats.aligned += len(pairs)
    if not examples:
        raise LmdistillError(f"{path}: no trainable token: {stats.records:,} records gave no example with a trained "
                             "token.")
    return examples


def cross_batch_fields(examples: list[dict], seq_len: int, teacher_pad: int, device) -> dict:
    """The teacher's side of a micro-batch: its ids and mask [B, Tt] (right-padded) and the aligned rows, flat
    into the student's [B, seq_len] and the teacher's [B, Tt] positions."""
    import torch

    length = max(len(ex["teacher_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), teacher_pad, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    s_rows, t_rows = [], []
    for b, ex in enumerate(examples):
        n = len(ex["teacher_ids"])
        ids[b, :n] = torch.as_tensor(ex["teacher_ids"], dtype=torch.long)
        mask[b, :n] = 1
        for s, t in ex["pairs"]:
            s_rows.append(b * seq_len + s)
            t_rows.append(b * length + t)
    return {"teacher_input_ids": ids.to(device), "teacher_attention_mask": mask.to(device),
            "student_rows": torch.tensor(s_rows, dtype=torch.long, device=device),
            "teacher_rows": torch.tensor(t_rows, dtype=torch.long, device=device)}
