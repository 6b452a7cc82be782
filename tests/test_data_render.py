"""Rendering conversations: trained spans are exactly the assistant replies plus their end-of-turn token."""

from __future__ import annotations

import copy

import pytest

from lmdistill.data import IGNORE_INDEX, render_conversation, render_conversation_examples, render_prompt
from lmdistill.data.render import _tokenize_with_spans
from lmdistill.errors import LmdistillError
from lmdistill.tokenizer import train_tokenizer

CORPUS = ["hello world, how are you today? I am fine, thank you.", "你好，今天天气很好。我们去公园吧！",
          "The quick brown fox jumps over the lazy dog."] * 20

# Qwen3's rule, simplified: only assistant turns after the last user message keep their think block, and the
# last one always gets one (empty if need be); earlier replies are rendered as bare content.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return train_tokenizer(vocab_size=400, texts=CORPUS)


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """Decoded runs of consecutive trained tokens; also checks labels == ids wherever trained."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def conversation(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for k, turn in enumerate(turns):
        message = {"role": "user" if k % 2 == 0 else "assistant", "content": turn}
        if isinstance(turn, tuple):  # (reasoning, content)
            message = {"role": "assistant", "reasoning_content": turn[0], "content": turn[1]}
        messages.append(message)
    return messages


def test_multi_turn_chatml_trains_replies_and_end_of_turn(chatml_tokenizer):
    messages = conversation("hello", "hello world", "how are you?", "I am fine, thank you.", system="Be brief.")
    ids, labels = render_conversation(chatml_tokenizer, messages)
    assert len(ids) == len(labels)
    assert trained_runs(chatml_tokenizer, ids, labels) == ["hello world<|im_end|>", "I am fine, thank you.<|im_end|>"]
    text = chatml_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                    "<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>user\nhow are you?<|im_end|>\n"
                    "<|im_start|>assistant\nI am fine, thank you.<|im_end|>\n")


def test_think_block_chatml_is_trained_with_the_reply(chatml_tokenizer):
    messages = conversation("你好", ("let me think", "你好！"), "again", "fine")
    ids, labels = render_conversation(chatml_tokenizer, messages)
    assert trained_runs(chatml_tokenizer, ids, labels) == [
        "<think>\nlet me think\n</think>\n\n你好！<|im_end|>", "fine<|im_end|>"]


def test_minimind_template_think_blocks(minimind_tokenizer):
    # MiniMind's template gives every assistant turn a think block; its generation prompt already holds an
    # empty one, so without reasoning only the content is trained, and with reasoning the block's inside.
    messages = conversation("你好", "你好！有什么可以帮你？", "讲个笑话", ("用户想听笑话", "好的。"))
    ids, labels = render_conversation(minimind_tokenizer, messages)
    assert trained_runs(minimind_tokenizer, ids, labels) == [
        "你好！有什么可以帮你？<|im_end|>", "用户想听笑话\n</think>\n\n好的。<|im_end|>"]
    text = minimind_tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n你好！" in text


def test_render_prompt_is_the_untrained_prefix(chatml_tokenizer, minimind_tokenizer):
    for tokenizer in (chatml_tokenizer, minimind_tokenizer):
        messages = conversation("hello", "hello world", "how are you?", "fine")
        ids, labels = render_conversation(tokenizer, messages)
        prompt = render_prompt(tokenizer, messages[:-1])
        last_start = max(k for k in range(1, len(ids)) if labels[k] != IGNORE_INDEX == labels[k - 1])
        assert prompt == ids[:last_start]  # the model continues exactly where training starts


def test_history_rewriting_template_splits_honestly(chatml_tokenizer):
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = QWEN3_LIKE
    messages = conversation("hello", ("r one", "hello world"), "how are you?", ("r two", "fine"))
    examples = render_conversation_examples(tokenizer, messages)
    assert len(examples) == 2
    first, second = (trained_runs(tokenizer, *example) for example in examples)
    assert first == ["<think>\nr one\n</think>\n\nhello world<|im_end|>"]
    assert second == ["<think>\nr two\n</think>\n\nfine<|im_end|>"]
    context = tokenizer.decode(examples[1][0], skip_special_tokens=False)
    assert "r one" not in context and "<|im_start|>assistant\nhello world<|im_end|>" in context
    with pytest.raises(LmdistillError, match="render_conversation_examples"):
        render_conversation(tokenizer, messages)


def test_trailing_user_turn_is_dropped(chatml_tokenizer):
    ids, labels = render_conversation(chatml_tokenizer, conversation("hello", "world", "unanswered"))
    assert "unanswered" not in chatml_tokenizer.decode(ids)
    assert trained_runs(chatml_tokenizer, ids, labels) == ["world<|im_end|>"]


def test_token_straddling_a_boundary_goes_with_its_start(chatml_tokenizer):
    text = "hello world"
    ids = chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chatml_tokenizer.convert_ids_to_tokens(ids)[-1] == "Ġworld"  # one token holding " world"
    _, labels_from_space = _tokenize_with_spans(chatml_tokenizer, text, [(5, 11)])
    _, labels_from_w = _tokenize_with_spans(chatml_tokenizer, text, [(6, 11)])
    assert labels_from_space[-1] == ids[-1]
    assert labels_from_w[-1] == IGNORE_INDEX  # " world" starts before the span: untrained


@pytest.mark.parametrize("messages, message", [
    (conversation("only a question"), "without any assistant turn"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
     "starts with an assistant turn"),
    ([{"role": "robot", "content": "x"}], "expected {'role'"),
    ([{"role": "user", "content": 3}], "expected {'role'"),
])
def test_bad_messages(chatml_tokenizer, messages, message):
    with pytest.raises(LmdistillError, match=message):
        render_conversation(chatml_tokenizer, messages)


def test_template_that_drops_reasoning_is_an_error(chatml_tokenizer):
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = QWEN3_LIKE.replace("(m.reasoning_content or '')", "''")
    with pytest.raises(LmdistillError, match="does not render it"):
        render_conversation(tokenizer, conversation("hi", ("secret reasoning", "ok")))


def test_template_rewriting_the_prompt_is_an_error(chatml_tokenizer):
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = (
        "{%- for m in messages %}{{- m.role + ': ' + m.content }}"
        "{%- if messages[-1].role == 'assistant' %}.{%- endif %}{{- '\\n' }}{%- endfor %}"
    )
    with pytest.raises(LmdistillError, match="cannot be located"):
        render_conversation(tokenizer, conversation("hi", "ok"))


def test_template_error_is_a_user_error(chatml_tokenizer):
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(LmdistillError, match="roles must alternate"):
        render_conversation(tokenizer, conversation("hi", "ok"))


def qwen3_template(minimind_template: str) -> str:
    """Qwen3's chat template, rebuilt from MiniMind's (which is Qwen3's with the think-block rule removed)."""
    keep_recent_reasoning = (
        "{%- if loop.index0 > ns.last_query_index %}"
        "{%- if loop.last or (not loop.last and reasoning_content) %}"
        "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
        " + content.lstrip('\\n') }}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    )
    generation_prompt = (
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"
    )
    start = minimind_template.index("{%- if true %}")
    end = minimind_template.index("{%- endif %}", start) + len("{%- endif %}")
    template = minimind_template[:start] + keep_recent_reasoning + minimind_template[end:]
    return template[: template.index("{%- if add_generation_prompt %}")] + generation_prompt


def test_qwen3_template_trains_each_turn_as_generated(minimind_tokenizer):
    tokenizer = copy.deepcopy(minimind_tokenizer)
    tokenizer.chat_template = qwen3_template(minimind_tokenizer.chat_template)
    messages = conversation("q1", "a1", "q2", ("r2", "a2"))
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>assistant\na1<|im_end|>" in full  # Qwen3 renders the old reply without a think block
    examples = render_conversation_examples(tokenizer, messages)
    assert [trained_runs(tokenizer, *e) for e in examples] == [
        ["<think>\n\n</think>\n\na1<|im_end|>"],  # as the model generates it when it is the last reply
        ["<think>\nr2\n</think>\n\na2<|im_end|>"],
    ]
    assert tokenizer.decode(examples[1][0], skip_special_tokens=False) == full
