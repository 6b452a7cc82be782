"""Prompts: the conversation a model is asked to continue, from any data format with conversations or prompts.

`lmdistill generate` writes replies to them, and on-policy distillation (`--on_policy_fraction 1`) trains on the
replies the student writes to them, so a prompts-only file (no assistant turn) is enough for both. A final
assistant reply, when a record has one, is dropped: it is what gets written anew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmdistill.errors import LmdistillError

Messages = list[dict[str, Any]]
_PLACEHOLDER_REPLY = {"prompt_completion": "completion", "alpaca": "output"}  # prompt-only records of these shapes


def load_prompts(path: str | Path, data_format: str = "auto") -> list[Messages]:
    """The prompt turns of every record: a conversation up to (not including) its final assistant reply."""
    from lmdistill.data.formats import detect_format, normalize_format, parse_record
    from lmdistill.data.readers import read_records

    fmt, prompts = normalize_format(data_format), []
    for location, record in read_records(path):
        try:
            record_format = detect_format(_with_placeholder(record)) if fmt == "auto" else fmt
            messages = parse_record(_with_placeholder(record, record_format), record_format)
            if isinstance(messages, str):
                raise LmdistillError("a plain-text record has no prompt; expected conversations or prompts.")
            if record_format in _PLACEHOLDER_REPLY and not record.get(_PLACEHOLDER_REPLY[record_format]):
                messages = messages[:-1]  # the placeholder reply
            while messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            if not any(m.get("role") == "user" for m in messages):
                raise LmdistillError("no user turn to reply to.")
        except LmdistillError as exc:
            raise LmdistillError(f"{location}: {exc}") from None
        fmt = record_format
        prompts.append(messages)
    if not prompts:
        raise LmdistillError(f"{path}: empty file: no prompts found.")
    return prompts


def _with_placeholder(record: dict, record_format: str | None = None) -> dict:
    """Prompt-only prompt/completion and alpaca records parse with an empty reply filled in."""
    out = dict(record)
    for fmt, key in _PLACEHOLDER_REPLY.items():
        if record_format in (None, fmt) and not out.get(key) and (("prompt" in out) if fmt == "prompt_completion"
                                                                    else ("instruction" in out)):
            out[key] = "."
    return out


def prompt_examples(path: str | Path, tokenizer, max_seq_len: int, data_format: str = "auto") -> list[dict]:
    """Each record's prompt as an example with nothing trained (`labels` all -100), rendered with the generation
    prompt of the next assistant turn; a prompt longer than `max_seq_len` keeps its last tokens."""
    from lmdistill.data.render import IGNORE_INDEX, render_prompt

    examples = []
    for messages in load_prompts(path, data_format):
        ids = render_prompt(tokenizer, messages)[-max_seq_len:]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)})
    return examples
