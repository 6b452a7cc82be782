"""Task accuracy from greedy generation: exact match (with a 95% Wilson interval) and Rouge-L.

    records = load_task_records("gsm8k_test.jsonl")          # conversations ending with the reference reply
    result = evaluate_task(model, tokenizer, records, task="exact_match", answer_regex=r"####\\s*(\\S+)")
    result["accuracy"], result["ci95_low"], result["ci95_high"], result["samples"][:2]

Each record is a conversation whose last message is the assistant's reference reply; the model continues the
conversation before it (rendered with the tokenizer's chat template and its generation prompt). Think blocks
are removed from the reply and the reference. A reply is correct when its normalized answer equals the
reference's (see `scoring.normalize_answer`); with `answer_regex` the answers are the last match of the regex
in each text (a reference without a match is an error, a reply without one is wrong). `task="rouge"` also
reports the mean Rouge-L F1 of the replies against the references (MiniLLM's metric) with a 95% interval.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from lmdistill.data import detect_format, parse_record, read_records, render_prompt
from lmdistill.data.formats import normalize_format
from lmdistill.errors import LmdistillError
from lmdistill.models.generation import Reply, generate_replies
from lmdistill.eval.scoring import (compile_answer_regex, extract_answer, mean_interval, normalize_answer, rouge_l,
                                    strip_think, wilson_interval)

TASKS = ("exact_match", "rouge")
NUM_SAMPLES = 5
Messages = list[dict[str, Any]]


def load_task_records(path: str | Path, data_format: str = "auto") -> list[Messages]:
    """The conversations of a data file (any conversation format `lmdistill.data` reads), each ending with the
    assistant's reference reply. The file's format is detected from its first record unless given."""
    fmt, records = normalize_format(data_format), []
    for location, record in read_records(path):
        try:
            record_format = detect_format(record) if fmt == "auto" else fmt
            messages = parse_record(record, record_format)
            if isinstance(messages, str):
                raise LmdistillError("a plain-text record; a task needs conversations whose last turn is the "
                                     "assistant's reference reply.")
            check_task_record(messages)
        except LmdistillError as exc:
            raise LmdistillError(f"{location}: {exc}") from None
        fmt = record_format
        records.append(messages)
    if not records:
        raise LmdistillError(f"{path}: empty file: no records found.")
    return records


def check_task_record(messages: Sequence[dict]) -> None:
    """A LmdistillError unless `messages` is a conversation ending with an assistant reply after a prompt."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise LmdistillError(f"expected a list of {{'role', 'content'}} messages, found {messages!r:.80}.")
    if not messages or messages[-1].get("role") != "assistant":
        last = messages[-1].get("role") if messages else "nothing"
        raise LmdistillError(f"expected the conversation to end with the assistant's reference reply, found {last!r} "
                             "as the last turn.")
    if len(messages) < 2:
        raise LmdistillError("the conversation is only an assistant reply; expected a prompt (user turn) before it.")


def evaluate_task(model, tokenizer, records: Sequence[Messages], task: str = "exact_match", max_new_tokens: int = 64,
                  batch_size: int = 16, answer_regex: str | re.Pattern | None = None, device=None,
                  max_prompt_tokens: int | None = None, progress: bool = True, description: str = "generating",
                  num_samples: int = NUM_SAMPLES) -> dict:
    """Greedy replies to every record's prompt, scored against its reference (see the module docstring).

    Returns `task`, `n`, `correct`, `accuracy`, `ci95_low`, `ci95_high` (Wilson), for `rouge` also `rouge_l`,
    `rouge_l_ci95_low`, `rouge_l_ci95_high`; `unfinished` (replies cut by `max_new_tokens`), `mean_new_tokens`,
    `truncated_prompts` (prompts longer than `max_prompt_tokens` keep their last tokens), `no_answer` (with
    `answer_regex`: replies without a match) and `samples`: the first `num_samples` records'
    prompt/prediction/reference.
    """
    if task not in TASKS:
        raise LmdistillError(f"task must be one of {', '.join(TASKS)}, found {task!r}.")
    if not records:
        raise LmdistillError("evaluate_task: no records to evaluate.")
    regex = compile_answer_regex(answer_regex)
    references, prompts, truncated = [], [], 0
    for k, messages in enumerate(records):
        try:
            check_task_record(messages)
            references.append(_reference(messages[-1]["content"], regex))
            ids = render_prompt(tokenizer, messages[:-1])
        except LmdistillError as exc:
            raise LmdistillError(f"record {k}: {exc}") from None
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids, truncated = ids[-max_prompt_tokens:], truncated + 1
        prompts.append(ids)
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size, device, progress=progress,
                               description=description)
    scored = [_score(reply, reference, regex, task) for reply, reference in zip(replies, references)]
    result = _summary(task, scored, replies, regex is not None)
    result["truncated_prompts"] = truncated
    result["samples"] = [_sample(records[k], replies[k], references[k], scored[k], regex is not None)
                         for k in range(min(num_samples, len(records)))]
    return result


def _reference(content: Any, regex: re.Pattern | None) -> str:
    if not isinstance(content, str):
        raise LmdistillError(f"the reference reply must be a string, found {type(content).__name__}.")
    reference = strip_think(content)
    if regex is not None and extract_answer(reference, regex) is None:
        raise LmdistillError(f"answer_regex {regex.pattern!r} finds no answer in the reference reply "
                             f"{reference[-80:]!r}; every reference must contain one.")
    return reference


def _score(reply: Reply, reference: str, regex: re.Pattern | None, task: str) -> dict:
    prediction = strip_think(reply.text)
    answer = extract_answer(prediction, regex)
    gold = extract_answer(reference, regex)  # never None: checked when the records were read
    score = {"answer": answer, "correct": answer is not None and normalize_answer(answer) == normalize_answer(gold)}
    if task == "rouge":
        score["rouge_l"] = rouge_l(prediction, reference)
    return score


def _summary(task: str, scored: list[dict], replies: list[Reply], with_regex: bool) -> dict:
    n, correct = len(scored), sum(s["correct"] for s in scored)
    low, high = wilson_interval(correct, n)
    result = {"task": task, "n": n, "correct": correct, "accuracy": correct / n, "ci95_low": low, "ci95_high": high}
    if task == "rouge":
        mean, low, high = mean_interval([s["rouge_l"] for s in scored])
        result.update(rouge_l=mean, rouge_l_ci95_low=low, rouge_l_ci95_high=high)
    if with_regex:
        result["no_answer"] = sum(s["answer"] is None for s in scored)
    result["unfinished"] = sum(not r.finished for r in replies)
    result["mean_new_tokens"] = sum(len(r.token_ids) for r in replies) / n
    return result


def _sample(messages: Messages, reply: Reply, reference: str, score: dict, with_regex: bool) -> dict:
    """The last user message as the prompt, the raw reply (think block included) and how it scored."""
    prompt = next((m["content"] for m in reversed(messages[:-1]) if m.get("role") == "user"), messages[-2]["content"])
    sample = {"prompt": prompt, "prediction": reply.text, "reference": reference, "correct": score["correct"]}
    if with_regex:
        sample["answer"] = score["answer"]
    if "rouge_l" in score:
        sample["rouge_l"] = score["rouge_l"]
    return sample
