"""Batched greedy generation and task scoring on a tiny random model (float64, so no argmax ties flip)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from lmdistill.data import render_prompt
from lmdistill.errors import LmdistillError
from lmdistill.eval import evaluate_task, generate_replies, load_task_records, rouge_l, stop_token_ids, wilson_interval
from lmdistill.models import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _model(tokenizer):
    """A tiny model with large random weights: its greedy replies vary (small init repeats one token)."""
    torch.manual_seed(0)
    model = load_model("nano", tokenizer=tokenizer, hidden_size=48, num_layers=2, verbose=False).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


@pytest.fixture(scope="module")
def records(tiny_chat):
    return load_task_records(tiny_chat)[:7]


@torch.no_grad()
def greedy_reference(model, prompt, max_new_tokens, stops):
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stops:
            return ids[len(prompt):], True
        ids.append(nxt)
    return ids[len(prompt):], False


def test_batched_left_padded_generation_equals_one_by_one(model, tok, records):
    prompts = [render_prompt(tok, r[:-1]) for r in records]
    assert len({len(p) for p in prompts}) > 2  # the batches really are padded
    stops = stop_token_ids(tok, model)
    batched = generate_replies(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    single = generate_replies(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False)
    assert batched == single
    for prompt, reply in zip(prompts, batched):
        ids, finished = greedy_reference(model, prompt, 12, set(stops))
        assert (reply.token_ids, reply.finished) == (ids, finished)
        assert reply.text == tok.decode(ids, skip_special_tokens=True)
    assert len({tuple(r.token_ids) for r in batched}) > 1  # not a degenerate model


def test_replies_stop_at_a_stop_token_per_row(model, tok, records):
    prompts = [render_prompt(tok, r[:-1]) for r in records[:4]]
    first, _ = greedy_reference(model, prompts[0], 6, set())
    stops = [first[2]]  # the third token of reply 0 ends it: two tokens remain, the other rows go on
    replies = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=4, eos_token_ids=stops,
                               progress=False)
    assert replies[0].token_ids == first[: first.index(stops[0])] and replies[0].finished
    for prompt, reply in zip(prompts, replies):
        assert (reply.token_ids, reply.finished) == greedy_reference(model, prompt, 6, set(stops))


def test_stop_token_ids_include_end_of_turn(tok, model):
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, model)
    assert tok.eos_token_id in stop_token_ids(tok)


def _replies(model, tok, records, max_new_tokens):
    return [tok.decode(greedy_reference(model, render_prompt(tok, r[:-1]), max_new_tokens,
                                        set(stop_token_ids(tok, model)))[0], skip_special_tokens=True) for r in records]


def test_exact_match_accuracy_and_interval(model, tok, records):
    predictions = _replies(model, tok, records, 8)
    gold = []
    for k, (messages, prediction) in enumerate(zip(records, predictions)):
        # records 0, 2, 4, 6 carry the model's own reply, written differently (spaces, case, a final full stop)
        reference = f"  {prediction.upper()}。 " if k % 2 == 0 else "certainly not what a random model says"
        gold.append([*messages[:-1], {"role": "assistant", "content": reference}])
    assert all(p.upper().casefold() == p.casefold() for p in predictions)  # upper() is undone by casefold
    result = evaluate_task(model, tok, gold, task="exact_match", max_new_tokens=8, batch_size=3, progress=False)
    assert (result["n"], result["correct"]) == (7, 4)
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert (result["ci95_low"], result["ci95_high"]) == pytest.approx(wilson_interval(4, 7))
    assert "rouge_l" not in result
    assert [s["prediction"] for s in result["samples"]] == predictions[:5]
    assert [s["correct"] for s in result["samples"]] == [True, False, True, False, True]
    assert result["samples"][1]["prompt"] == records[1][-2]["content"]
    json.dumps(result)  # eval.json material


def test_rouge_task(model, tok, records):
    predictions = _replies(model, tok, records[:4], 8)
    assert all(p.split() for p in predictions)
    references = [predictions[0], "the river", predictions[2] + " and more words here", "a red apple"]
    gold = [[*r[:-1], {"role": "assistant", "content": ref}] for r, ref in zip(records, references)]
    result = evaluate_task(model, tok, gold, task="rouge", max_new_tokens=8, progress=False)
    scores = [rouge_l(p, ref) for p, ref in zip(predictions, references)]
    assert scores[0] == 1.0 and 0 < scores[2] < 1
    assert result["rouge_l"] == pytest.approx(sum(scores) / 4)
    assert result["rouge_l_ci95_low"] <= result["rouge_l"] <= result["rouge_l_ci95_high"]
    assert [s["rouge_l"] for s in result["samples"]] == pytest.approx(scores)
    assert result["correct"] >= 1  # record 0 is also an exact match


def test_answer_regex(model, tok, records):
    gold = [[*r[:-1], {"role": "assistant", "content": f"so the answer is\n#### {k}"}]
            for k, r in enumerate(records[:3])]
    result = evaluate_task(model, tok, gold, max_new_tokens=4, answer_regex=r"####\s*(\S+)", progress=False)
    assert result["no_answer"] == 3 and result["correct"] == 0  # a reply without the marker is wrong
    assert result["samples"][0]["answer"] is None
    gold[1][-1]["content"] = "no marker"
    with pytest.raises(LmdistillError, match=r"record 1: answer_regex .* finds no answer in the reference"):
        evaluate_task(model, tok, gold, max_new_tokens=4, answer_regex=r"####\s*(\S+)", progress=False)


def test_long_prompts_keep_their_last_tokens(model, tok, records):
    result = evaluate_task(model, tok, records[:3], max_new_tokens=2, max_prompt_tokens=5, progress=False)
    assert result["truncated_prompts"] == 3


def test_bad_records_are_user_errors(model, tok, records):
    ends_with_user = records[0][:-1]
    with pytest.raises(LmdistillError, match=r"record 1: expected the conversation to end with the assistant"):
        evaluate_task(model, tok, [records[0], ends_with_user], progress=False)
    with pytest.raises(LmdistillError, match="task must be one of"):
        evaluate_task(model, tok, records, task="bleu", progress=False)
    with pytest.raises(LmdistillError, match="no records"):
        evaluate_task(model, tok, [], progress=False)


def test_load_task_records_formats_and_errors(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]))
    assert load_task_records(alpaca) == [[{"role": "user", "content": "Add 2 and 3."},
                                          {"role": "assistant", "content": "5"}]]
    bad = tmp_path / "bad.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    open_ended = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "and?"}]}
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps(open_ended) + "\n")
    with pytest.raises(LmdistillError, match=r"bad\.jsonl:3: expected the conversation to end with the assistant"):
        load_task_records(bad)
    text = tmp_path / "doc.txt"
    text.write_text("just some prose")
    with pytest.raises(LmdistillError, match=r"doc\.txt:1: a plain-text record"):
        load_task_records(text)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LmdistillError, match="empty file"):
        load_task_records(empty)


def test_minimind_template_think_block(minimind_tokenizer):
    """MiniMind's generation prompt ends with an empty think block; replies are scored after it."""
    messages = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "<think>\n\n</think>\n\n２。"}]
    prompt = minimind_tokenizer.decode(render_prompt(minimind_tokenizer, messages[:-1]))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    model = _model(minimind_tokenizer)
    (prediction,) = _replies(model, minimind_tokenizer, [messages], 4)
    result = evaluate_task(model, minimind_tokenizer, [messages], max_new_tokens=4, progress=False)
    assert result["samples"][0]["prediction"] == prediction
    assert result["samples"][0]["reference"] == "２。"
    assert result["correct"] == (prediction.strip() in ("2", "２", "2.", "２。"))
