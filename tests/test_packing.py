"""Packing (`--packing`): several examples a row, each attending only to itself with positions restarting; every
example gets the same logits, loss and gradients as alone. Length grouping (`--group_by_length`): the same examples,
other micro-batches."""

from __future__ import annotations

import json

import pytest
import torch
from train_args import make_plan

from lmdistill.cli import main
from lmdistill.data import pad_batch
from lmdistill.data.collate import pack_batch
from lmdistill.errors import LmdistillError
from lmdistill.models import load_model
from lmdistill.train.loop import Trainer

PRESETS = ["nano", "minimind2-small", "minimind3"]  # Qwen3-style, Llama-architecture MiniMind2, Qwen3 MiniMind3


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 12, 4, 9):
        ids = torch.randint(3, 90, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_examples_get_the_logits_they_get_alone(preset, tiny_tokenizer_dir):
    from lmdistill.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = load_model(preset, tokenizer=load_tokenizer(tiny_tokenizer_dir), hidden_size=32, num_layers=2,
                       verbose=False).double().eval()
    examples = _examples()
    packed = pack_batch(examples, 0, row_tokens=24)  # 32 tokens in rows of 24: two rows, two examples in one
    assert packed["input_ids"].shape[0] == 2 and sorted(packed["order"]) == [0, 1, 2, 3]
    with torch.no_grad():
        # no KV cache: transformers builds the block-diagonal mask from the position ids only without one
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for row, (ids, pos) in enumerate(zip(packed["input_ids"], packed["position_ids"])):
            starts = [k for k in range(len(pos)) if pos[k] == 0]
            for a, b in zip(starts, starts[1:] + [len(pos)]):
                alone = [e for e in examples if e["input_ids"] == ids[a:b].tolist()]
                if not alone:  # the padding run
                    continue
                ref = model(input_ids=torch.tensor([alone[0]["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[row, a:b], ref, rtol=1e-9, atol=1e-9)


def test_pack_batch_keeps_every_trained_label_but_the_first_of_each_example():
    examples = _examples()
    packed = pack_batch(examples, 0, row_tokens=40)
    padded = pad_batch(examples, 0)
    trained = lambda labels: int((labels[:, 1:] != -100).sum())  # noqa: E731  (positions a shifted loss uses)
    assert trained(packed["labels"]) + 0 == sum(sum(x != -100 for x in e["labels"][1:]) for e in examples)
    assert trained(padded["labels"]) == trained(packed["labels"])
    assert packed["input_ids"].shape == (1, 32) and int(packed["attention_mask"].sum()) == 32
    with pytest.raises(LmdistillError, match="does not fit a row of 8"):
        pack_batch(examples, 0, row_tokens=8)


def _argv(command, teacher, data, out, *extra):
    model = (["--teacher", str(teacher), "--student", "nano", "--temperature", "2", "--alpha", "0.3"]
             if command == "distill" else ["--model", "nano", "--tokenizer", str(teacher)])
    return [*model, "--hidden_size", "32", "--num_layers", "1", "--data", str(data), "--output_dir", str(out),
            "--max_seq_len", "192", "--batch_size", "6", *map(str, extra)]


def _step(command, argv):
    trainer = Trainer(make_plan(command, argv))
    batches = trainer.micro_batches(0)
    stats = trainer.accumulate(batches)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.close()
    return stats, grads, batches


@pytest.fixture
def mixed_lengths(tiny_chat, tmp_path):
    """Conversations of one and of two turns, so that a micro-batch has short examples to pack beside long ones."""
    path = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in tiny_chat.read_text().splitlines()]
    for k, row in enumerate(rows):
        if k % 3:
            row["conversations"] = row["conversations"][:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_packed_step_has_the_loss_and_gradients_of_the_padded_one(command, tiny_teacher_dir, mixed_lengths,
                                                                    tmp_path):
    data = mixed_lengths
    padded_stats, padded_grads, padded = _step(command, _argv(command, tiny_teacher_dir, data, tmp_path / "a"))
    packed_stats, packed_grads, packed = _step(command, _argv(command, tiny_teacher_dir, data, tmp_path / "b",
                                                              "--packing"))
    assert packed[0].input_ids.shape[0] < padded[0].input_ids.shape[0]  # fewer rows: 6 examples in fewer rows
    assert packed[0].input_ids.shape[1] == padded[0].input_ids.shape[1]  # none longer than the longest example
    assert sorted(packed[0].example_index) == sorted(padded[0].example_index)
    assert packed_stats["trained_tokens"] == padded_stats["trained_tokens"]
    for key in ("loss", "kd_loss", "ce_loss"):
        if key in padded_stats:
            assert packed_stats[key] == pytest.approx(padded_stats[key], rel=1e-5), key
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_teacher_cache_reads_packed_rows_in_their_order(tiny_teacher_dir, tiny_chat, tmp_path):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data", str(tiny_chat), "--output_dir",
                 str(cache), "--max_seq_len", "192", "--top_k", "320"]) == 0
    online, _, _ = _step("distill", _argv("distill", tiny_teacher_dir, tiny_chat, tmp_path / "a", "--packing",
                                          "--temperature", "1"))
    argv = _argv("distill", tiny_teacher_dir, tiny_chat, tmp_path / "b", "--packing", "--temperature", "1")
    argv[argv.index("--teacher"):argv.index("--teacher") + 2] = ["--teacher_cache", str(cache)]
    cached, _, _ = _step("distill", argv)
    assert cached["kd_loss"] == pytest.approx(online["kd_loss"], rel=1e-5)


def test_packing_is_refused_where_rows_are_made_per_example(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    argv = ["distill", *_argv("distill", tiny_teacher_dir, tiny_chat, tmp_path / "run", "--packing",
                              "--on_policy_fraction", "0.5")]
    assert main(argv) == 1
    assert "--packing: not combined with the on policy batch source" in capsys.readouterr().err


def test_models_that_cannot_keep_examples_apart_are_refused(monkeypatch, tiny_teacher_dir, tiny_chat, tmp_path):
    import lmdistill.models.hidden as hidden

    monkeypatch.setattr(hidden, "NOT_PACKABLE_MODELS", (*hidden.NOT_PACKABLE_MODELS, "qwen3"))
    with pytest.raises(LmdistillError, match="--packing: --student is a qwen3 model .* use --group_by_length"):
        Trainer(make_plan("distill", _argv("distill", tiny_teacher_dir, tiny_chat, tmp_path / "r", "--packing")))


def test_length_grouping_takes_the_same_examples_per_window_in_other_batches(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.batches import GROUP_WINDOW_STEPS, DatasetStream

    examples = [{"input_ids": [1] * (3 + (i * 7) % 40), "labels": [1] * (3 + (i * 7) % 40)} for i in range(200)]
    plain = DatasetStream(examples, 0, 4, 1, seed=5)
    grouped = DatasetStream(examples, 0, 4, 1, seed=5, group_by_length=True)
    window = range(GROUP_WINDOW_STEPS)
    take = lambda s: [i for step in window for i in s.micro_batch_indices(step, 0)]  # noqa: E731
    assert sorted(take(plain)) == sorted(take(grouped))
    spread = lambda idx: max(len(examples[i]["input_ids"]) for i in idx) - min(len(examples[i]["input_ids"]) for i in idx)  # noqa: E731
    assert sum(spread(grouped.micro_batch_indices(s, 0)) for s in window) < sum(
        spread(plain.micro_batch_indices(s, 0)) for s in window) / 3
    again = DatasetStream(examples, 0, 4, 1, seed=5, group_by_length=True)
    assert [again.micro_batch_indices(s, 0) for s in (70, 3)] == [grouped.micro_batch_indices(s, 0) for s in (70, 3)]


def test_group_by_length_and_packing_run_from_the_cli(tiny_teacher_dir, mixed_lengths, tmp_path):
    for flags in (["--group_by_length"], ["--group_by_length", "--packing"]):
        out = tmp_path / "-".join(flags)
        argv = ["distill", *_argv("distill", tiny_teacher_dir, mixed_lengths, out, "--max_steps", 2, *flags)]
        assert main(argv) == 0 and (out / "model.safetensors").is_file()
