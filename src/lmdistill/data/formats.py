"""Records -> conversations or documents: the supported record shapes, detected from their fields.

A record becomes either a *conversation* (a list of `{"role": "system"|"user"|"assistant", "content": str}`
messages, assistant messages optionally with `reasoning_content`) or a *document* (a `str` of plain text for
pretraining). Shapes:

- `minimind`:  {"conversations": [{"role", "content", "reasoning_content"?}, ...]} (also under "messages")
- `sharegpt`:  {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?}
- `alpaca`:    {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- `prompt_completion`: {"prompt", "completion"} (strings, or lists of role/content messages)
- `guanaco`:   {"text": "### Human: ... ### Assistant: ..."} (turns split on those markers)
- `text`:      {"text": ...} without turn markers, or a .txt file: every token is trained.

A field that is present but null (parquet and `datasets` fill missing columns with null) counts as absent.
"""

from __future__ import annotations

import re
from typing import Any

from lmdistill.errors import LmdistillError

Message = dict[str, str]
Parsed = list[Message] | str  # a conversation or a plain-text document

FORMATS = ("minimind", "sharegpt", "alpaca", "prompt_completion", "guanaco", "text")
ALIASES = {"conversations": "minimind", "messages": "minimind", "plain": "text", "pretrain": "text"}
SHAPES = {
    "minimind": '{"conversations": [{"role": "system|user|assistant", "content": ...}]}',
    "sharegpt": '{"conversations": [{"from": "human|gpt|system", "value": ...}]}',
    "alpaca": '{"instruction", "input", "output"} (optional "system", "history")',
    "prompt_completion": '{"prompt", "completion"}',
    "guanaco": '{"text": "### Human: ... ### Assistant: ..."}',
    "text": '{"text": ...} (plain text, every token trained)',
}
ACCEPTED_SHAPES = "; ".join(f"{name} {shape}" for name, shape in SHAPES.items())
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


def normalize_format(data_format: str) -> str:
    """Canonical format name for `data_format` ("auto" stays "auto"); an unknown name is an error."""
    name = ALIASES.get(data_format.replace("-", "_"), data_format.replace("-", "_"))
    if name != "auto" and name not in FORMATS:
        raise LmdistillError(f"data_format must be 'auto' or one of {', '.join(FORMATS)}; found '{data_format}'.")
    return name


def detect_format(record: dict[str, Any]) -> str:
    """The format a record's fields say it is in; LmdistillError listing the accepted shapes otherwise."""
    turns = _get(record, "conversations", _get(record, "messages"))
    if turns is not None:
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if _get(first, "role") is not None:
            return "minimind"
        if _get(first, "from") is not None:
            return "sharegpt"
        raise LmdistillError(f"'conversations' must be a non-empty list of {{\"role\", \"content\"}} or "
                             f"{{\"from\", \"value\"}} turns, found {str(turns)[:80]!r}. "
                             f"Accepted shapes: {ACCEPTED_SHAPES}.")
    if _get(record, "instruction") is not None:
        return "alpaca"
    if _get(record, "prompt") is not None or _get(record, "completion") is not None:
        return "prompt_completion"
    if isinstance(_get(record, "text"), str):
        markers = {m.group(1) for m in _GUANACO_MARKER.finditer(record["text"])}
        return "guanaco" if markers == {"Human", "Assistant"} else "text"
    found = sorted(record) if record else "no fields"
    raise LmdistillError(f"unknown record shape (fields: {found}). Accepted shapes: {ACCEPTED_SHAPES}.")


def parse_record(record: dict[str, Any], data_format: str) -> Parsed:
    """A record in `data_format` (a canonical name, not "auto") as a conversation or a document."""
    return _PARSERS[data_format](record)


def record_texts(parsed: Parsed) -> list[str]:
    """The natural-language text of a parsed record (message contents and reasoning), e.g. to train a tokenizer."""
    if isinstance(parsed, str):
        return [parsed]
    return [m[k] for m in parsed for k in ("reasoning_content", "content") if m.get(k)]


def _get(record: dict[str, Any], key: str, default: Any = None) -> Any:
    value = record.get(key)
    return default if value is None else value


def _require(record: dict[str, Any], key: str, fmt: str, kind: type | tuple = str) -> Any:
    value = _get(record, key)
    if value is None:
        raise LmdistillError(f"missing field '{key}': expected the {fmt} shape {SHAPES[fmt]}, found fields "
                             f"{sorted(record)}.")
    return _check_type(value, key, kind)


def _check_type(value: Any, where: str, kind: type | tuple) -> Any:
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LmdistillError(f"field '{where}' must be a {expected}, found {type(value).__name__}.")
    return value


def _message(role: str, content: Any, where: str, reasoning: Any = None) -> Message:
    message = {"role": role, "content": _check_type(content, where, str)}
    if reasoning is not None:
        if role != "assistant":
            raise LmdistillError(f"{where}: 'reasoning_content' is only allowed on assistant turns, found on {role}.")
        message["reasoning_content"] = _check_type(reasoning, f"{where}.reasoning_content", str)
    return message


def _parse_role_content(turns: Any, field: str) -> list[Message]:
    messages = []
    for i, turn in enumerate(_check_type(turns, field, list)):
        where = f"{field}[{i}]"
        _check_type(turn, where, dict)
        for key in ("role", "content"):
            if _get(turn, key) is None:
                raise LmdistillError(f"{where}: missing field '{key}' (found fields: {sorted(turn)}); expected "
                                     f'{{"role": "system|user|assistant", "content": ...}}.')
        if turn["role"] not in ROLES:
            raise LmdistillError(f"{where}: role must be one of {', '.join(ROLES)}, found '{turn['role']}'.")
        messages.append(_message(turn["role"], turn["content"], f"{where}.content", _get(turn, "reasoning_content")))
    return _nonempty(messages, field)


def _nonempty(messages: list[Message], field: str) -> list[Message]:
    if not messages:
        raise LmdistillError(f"'{field}' is an empty conversation; expected at least one user and one assistant turn.")
    return messages


def _parse_minimind(record: dict[str, Any]) -> list[Message]:
    field = "conversations" if _get(record, "conversations") is not None else "messages"
    if _get(record, field) is None:
        _require(record, "conversations", "minimind", list)
    return _parse_role_content(record[field], field)


def _parse_sharegpt(record: dict[str, Any]) -> list[Message]:
    turns = _require(record, "conversations", "sharegpt", list)
    messages = [_message("system", record["system"], "system")] if _get(record, "system") else []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        _check_type(turn, where, dict)
        missing = [key for key in ("from", "value") if _get(turn, key) is None]
        if missing:
            raise LmdistillError(f"{where}: missing field '{missing[0]}' (found fields: {sorted(turn)}); "
                                 'expected {"from": "human|gpt|system", "value": ...}.')
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise LmdistillError(f"{where}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, found '{turn['from']}'.")
        messages.append(_message(role, turn["value"], f"{where}.value"))
    return _nonempty(messages, "conversations")


def _parse_alpaca(record: dict[str, Any]) -> list[Message]:
    instruction = _require(record, "instruction", "alpaca")
    output = _require(record, "output", "alpaca")
    query = "\n".join(part for part in (instruction, _check_type(_get(record, "input", ""), "input", str)) if part)
    messages = [_message("system", record["system"], "system")] if _get(record, "system") else []
    for i, pair in enumerate(_check_type(_get(record, "history", []), "history", list)):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise LmdistillError(f"history[{i}]: expected a [user, assistant] pair, found {pair!r:.80}.")
        messages += [_message("user", pair[0], f"history[{i}][0]"), _message("assistant", pair[1], f"history[{i}][1]")]
    return messages + [_message("user", query, "instruction"), _message("assistant", output, "output")]


def _parse_prompt_completion(record: dict[str, Any]) -> list[Message]:
    prompt = _require(record, "prompt", "prompt_completion", (str, list))
    completion = _require(record, "completion", "prompt_completion", (str, list))
    if isinstance(prompt, str):
        messages = [_message("user", prompt, "prompt")]
    else:
        messages = _parse_role_content(prompt, "prompt")
    if isinstance(completion, str):
        return messages + [_message("assistant", completion, "completion")]
    return messages + _parse_role_content(completion, "completion")


def _parse_guanaco(record: dict[str, Any]) -> list[Message]:
    text = _require(record, "text", "guanaco")
    pieces = _GUANACO_MARKER.split(text)  # [before, role, content, role, content, ...]
    messages = [_message("system", pieces[0].strip(), "text")] if pieces[0].strip() else []
    for role, content in zip(pieces[1::2], pieces[2::2]):
        messages.append(_message("user" if role == "Human" else "assistant", content.strip(), "text"))
    if not any(m["role"] == "assistant" for m in messages):
        raise LmdistillError("a guanaco 'text' without any '### Assistant:' turn; expected "
                             "'### Human: ... ### Assistant: ...'.")
    return messages


def _parse_text(record: dict[str, Any]) -> str:
    text = _require(record, "text", "text")
    if not text.strip():
        raise LmdistillError("field 'text' is empty; expected the text of a document.")
    return text


_PARSERS = {
    "minimind": _parse_minimind,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
    "prompt_completion": _parse_prompt_completion,
    "guanaco": _parse_guanaco,
    "text": _parse_text,
}
