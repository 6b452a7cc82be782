"""Conversations -> token ids + labels, with the tokenizer's own chat template (ChatML when it has none).

Rule: every assistant turn is trained (its content, its think block if any, and its end-of-turn token),
nothing else. `labels[i] == input_ids[i]` where trained, -100 elsewhere (HF alignment: the model shifts).

How the trained spans are found (never by searching for marker token sequences in the ids):

1. For assistant turn i, render three texts with the template: `before` = messages[:i],
   `prompt` = messages[:i] + generation prompt, `turn` = messages[:i+1]. The turn's trained characters start
   where `turn` departs from `prompt` (their common prefix: the header and whatever the generation prompt
   already contains, e.g. MiniMind's `<think>\\n`), and end at the end of `turn` minus trailing whitespace
   (the newline a template writes after the end-of-turn token is not something the model must produce).
2. Prefix property: `turn` must be a prefix of the text of the whole conversation. Templates that rewrite
   earlier turns once later ones follow (Qwen3 drops old think blocks, and gives only the last reply an
   empty one) break it. Such a turn is then trained in a separate sequence that ends with it, i.e. in the
   exact form the model produces at inference; the longer sequence keeps it as untrained context. So a
   conversation may give several sequences (`render_conversation_examples`); each turn is trained once.
3. The whole text is tokenized once, with character offsets; a token is trained iff its start offset lies
   inside a trained character span. A token straddling a boundary (a BPE merge across it) thus belongs to
   the trained side only when it starts inside the assistant span.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Sequence

from lmdistill.errors import LmdistillError

IGNORE_INDEX = -100

# Plain ChatML; an assistant turn with a non-empty `reasoning_content` gets MiniMind's think block first.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is string"
    " and message.reasoning_content.strip('\\n') %}"
    "{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Messages = Sequence[dict[str, Any]]
Example = tuple[list[int], list[int]]


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or ChatML when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    return template or CHATML_TEMPLATE


def render_text(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The conversation as text, with the template; a template error becomes a LmdistillError."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=chat_template(tokenizer), tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja2 TemplateError, or raise_exception() inside the template
        raise LmdistillError(f"the chat template cannot render this conversation: {exc}") from None


def render_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of `messages` plus the generation prompt of the next assistant turn (what a model continues)."""
    _check_messages(messages, need_assistant=False)
    return tokenizer(render_text(tokenizer, messages, True), add_special_tokens=False, verbose=False)["input_ids"]


def render_conversation(tokenizer, messages: Messages) -> Example:
    """`(input_ids, labels)` of a whole conversation with every assistant turn trained.

    Raises LmdistillError when the template rewrites earlier turns once later ones follow (e.g. Qwen3), since
    then no single sequence trains every turn as the model produces it; `render_conversation_examples`
    handles that case (and is what `load_examples` uses).
    """
    examples = render_conversation_examples(tokenizer, messages)
    if len(examples) > 1:
        raise LmdistillError(
            "the chat template renders earlier assistant turns differently once later turns follow, so no single "
            f"sequence trains all of them; use render_conversation_examples (it gives {len(examples)} sequences)."
        )
    return examples[0]


def render_conversation_examples(tokenizer, messages: Messages) -> list[Example]:
    """`[(input_ids, labels), ...]` training every assistant turn exactly once (one sequence when possible).

    Messages after the last assistant turn are dropped (nothing after them is trained). Lists of ints, equal
    lengths, not truncated.
    """
    messages = _check_messages(messages, need_assistant=True)
    turns = {i: _locate_turn(tokenizer, messages, i) for i, m in enumerate(messages) if m["role"] == "assistant"}
    pending, examples = sorted(turns), []
    while pending:
        full = turns[pending[-1]][0]  # the text of messages[:last pending + 1]
        kept = [i for i in pending if full.startswith(turns[i][0])]
        examples.append(_tokenize_with_spans(tokenizer, full, [turns[i][1:] for i in kept]))
        pending = [i for i in pending if i not in kept]
    return examples[::-1]


def _check_messages(messages: Messages, need_assistant: bool) -> list[dict[str, Any]]:
    """Validate roles/contents; with `need_assistant`, also drop what follows the last assistant turn."""
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise LmdistillError(f"message {k}: expected {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                                 f"found {m!r:.100}.")
    if not need_assistant:
        return list(messages)
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LmdistillError("a conversation without any assistant turn: nothing to train.")
    if messages[0]["role"] == "assistant":
        raise LmdistillError("the conversation starts with an assistant turn; expected a user or system message "
                             "before the first assistant reply.")
    return list(messages[: last + 1])


def _locate_turn(tokenizer, messages: list[dict[str, Any]], i: int) -> tuple[str, int, int]:
    """`(text of messages[:i+1], start, end)`: the trained characters of assistant turn i in that text."""
    turn = render_text(tokenizer, messages[: i + 1])
    before = render_text(tokenizer, messages[:i])
    prompt = render_text(tokenizer, messages[:i], add_generation_prompt=True)
    if not turn.startswith(before):
        raise LmdistillError(
            f"message {i}: the chat template renders the conversation before this assistant turn differently once "
            "the turn is added, so its tokens cannot be located; this template is not supported for training."
        )
    reasoning = (messages[i].get("reasoning_content") or "").strip()
    if reasoning and reasoning not in turn[len(before):]:
        raise LmdistillError(f"message {i}: has 'reasoning_content' but the tokenizer's chat template does not "
                             "render it; the reasoning would be silently dropped.")
    start = max(len(before), _common_prefix_len(prompt, turn))
    end = len(turn.rstrip())
    if end <= start:
        raise LmdistillError(f"message {i}: the assistant turn renders to nothing trainable with this template.")
    return turn, start, end


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> Example:
    """Tokenize `text` once; label every token whose start offset lies in one of the character `spans`."""
    if not getattr(tokenizer, "is_fast", True):
        raise LmdistillError("a fast (Rust `tokenizers`) tokenizer is needed: trained spans are mapped by offsets.")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoding["input_ids"])
    starts = [start for start, _ in encoding["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    for span_start, span_end in spans:
        for k in range(bisect_left(starts, span_start), bisect_left(starts, span_end)):
            labels[k] = ids[k]
    return ids, labels
