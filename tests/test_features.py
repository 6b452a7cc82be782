"""Hidden-state (feature) distillation: layer maps, the feature term against a float64 reference, layer capture
against HF's hidden states, and runs (metrics, projectors saved apart from the HF model, resume, LoRA, DDP)."""

from __future__ import annotations

import json

import pytest
import torch
from runs import lmdistill, torchrun

from lmdistill.cli import main, parse_plan
from lmdistill.errors import LmdistillError
from lmdistill.losses.features import FeatureProjectors, parse_layer_map


def _argv(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--hidden_size", "32", "--num_layers", "2",
            "--data", str(data), "--output_dir", str(out), "--max_seq_len", "64", "--batch_size", "4",
            "--log_interval", "1", "--seed", "2", "--feature_loss", "mse", *map(str, extra)]


def test_auto_spreads_student_layers_over_the_teacher_last_onto_last():
    assert parse_layer_map("auto", 2, 4) == [(0, 1), (1, 3)]
    assert parse_layer_map("auto", 4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert parse_layer_map("auto", 3, 8) == [(0, 2), (1, 4), (2, 7)]
    assert parse_layer_map("0:1, -1:-1", 2, 4) == [(0, 1), (1, 3)]


@pytest.mark.parametrize("text,match", [
    ("0-1", "expected auto or pairs 'student:teacher'"),
    ("0:4", "the student has layers 0..1 and the teacher 0..3"),
    ("0:1,0:2", "a student layer appears twice"),
])
def test_bad_layer_maps_say_what_is_wrong(text, match):
    with pytest.raises(LmdistillError, match=match):
        parse_layer_map(text, 2, 4)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_term_matches_a_float64_reference(kind):
    g = torch.Generator().manual_seed(0)
    B, T, Hs, Ht = 2, 5, 3, 4
    student = {0: torch.randn(B, T, Hs, generator=g, dtype=torch.float64, requires_grad=True),
               1: torch.randn(B, T, Hs, generator=g, dtype=torch.float64, requires_grad=True)}
    teacher = {1: torch.randn(B, T, Ht, generator=g, dtype=torch.float64),
               3: torch.randn(B, T, Ht, generator=g, dtype=torch.float64)}
    proj = FeatureProjectors([(0, 1), (1, 3)], Hs, Ht).double()
    rows = torch.tensor([1, 2, 6, 9])  # trained positions only
    got = proj.loss_sum(student, teacher, rows, kind)
    grads = torch.autograd.grad(got, [student[0], student[1], *proj.parameters()])

    ref = 0.0
    for (s, t), m in zip([(0, 1), (1, 3)], proj.maps):
        p = student[s].reshape(-1, Hs)[rows] @ m.weight.T
        h = teacher[t].reshape(-1, Ht)[rows]
        if kind == "mse":
            ref = ref + ((p - h) ** 2).mean(-1).sum()
        else:
            ref = ref + (1 - (p * h).sum(-1) / (p.norm(dim=-1) * h.norm(dim=-1))).sum()
    ref = ref / 2
    want = torch.autograd.grad(ref, [student[0], student[1], *proj.parameters()])
    torch.testing.assert_close(got.double(), ref)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a.double(), b)
    assert grads[0].reshape(-1, Hs)[[0, 3, 4, 5, 7, 8]].abs().sum() == 0  # untrained positions get nothing


def test_equal_widths_start_at_the_identity():
    proj = FeatureProjectors([(0, 0)], 8, 8)
    assert torch.equal(proj.maps[0].weight, torch.eye(8))
    assert not torch.equal(FeatureProjectors([(0, 0)], 8, 6).maps[0].weight[:6, :6], torch.eye(6))


def test_captured_layers_are_the_decoder_layer_outputs(tiny_teacher_dir):
    from lmdistill.models import forward_hidden, load_model
    from lmdistill.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_teacher_dir)
    torch.manual_seed(0)
    model = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=3, verbose=False).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        out = forward_hidden(model, ids, mask, layers=[0, 2, 1])
    assert sorted(out.layers) == [0, 1, 2]
    torch.testing.assert_close(out.layers[0], ref[1])
    torch.testing.assert_close(out.layers[1], ref[2])
    torch.testing.assert_close(model.model.norm(out.layers[2]), out.hidden)  # the last layer, before the norm
    with pytest.raises(LmdistillError, match="layer 3: the model has decoder layers 0..2"):
        forward_hidden(model, ids, mask, layers=[3])


def test_a_feature_run_logs_the_term_and_saves_projectors_beside_the_model(tiny_teacher_dir, tiny_chat, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 3, "--feature_weight", 0.5)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["feature_loss"] > 0 and r["kd_loss"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["kd_loss"] + 0.5 * rows[0]["feature_loss"], rel=1e-5)
    projectors = load_file(out / "feature_projectors.safetensors")
    assert sorted(projectors) == ["maps.0.weight", "maps.1.weight"]  # nano 2 layers -> teacher 2 layers
    assert projectors["maps.0.weight"].shape == (48, 32)  # student width 32 -> teacher width 48
    assert not any("projector" in k for k in load_file(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain HF model, no stray weights
    assert model.config.hidden_size == 32


def test_feature_runs_resume_exactly(tiny_teacher_dir, tiny_chat, tmp_path):
    def run(out, env=None, *extra):
        return lmdistill(_argv(tiny_teacher_dir, tiny_chat, out, "--max_steps", 4, "--save_interval", 2, *extra), env)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(straight).returncode == 0
    assert (straight / "checkpoint-2" / "feature_projectors.safetensors").is_file()
    assert run(killed, {"LMDISTILL_KILL_AT_STEP": "3"}).returncode == -9
    resumed = run(killed, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(straight)[-1], rows(killed)[-1]
    assert a["feature_loss"] == pytest.approx(b["feature_loss"], rel=1e-5)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_lora_student_trains_its_projectors(tiny_teacher_dir, tiny_chat, tmp_path):
    from lmdistill.train.loop import Trainer

    trainer = Trainer(parse_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path, "--lora_r", 4,
                                                  "--feature_loss", "cosine")[1:]))
    before = trainer.projectors.maps[0].weight.detach().clone()
    stats = trainer.step()
    assert stats["feature_loss"] > 0
    assert not torch.equal(before, trainer.projectors.maps[0].weight)
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("flags,message", [
    (["--layer_map", "0:9"], "--layer_map '0:9': the student has layers 0..1 and the teacher 0..1"),
    (["--layer_map", "zero"], "--layer_map: expected auto or pairs"),
    (["--method", "minillm"], "--feature_loss: not combined with --method minillm"),
])
def test_bad_feature_options_are_refused(tiny_teacher_dir, tiny_chat, tmp_path, capsys, flags, message):
    assert main(_argv(tiny_teacher_dir, tiny_chat, tmp_path / "run", *flags)) == 1
    assert message in capsys.readouterr().err


def test_caches_and_ensembles_have_no_hidden_states_to_match(tiny_teacher_dir, tiny_chat, tmp_path, capsys):
    argv = _argv(tiny_teacher_dir, tiny_chat, tmp_path / "a")
    i = argv.index("--teacher")
    argv[i : i + 2] = ["--teacher_cache", str(tmp_path)]
    assert main(argv) == 1
    assert "a teacher cache holds no hidden states" in capsys.readouterr().err
    assert main(_argv(tiny_teacher_dir, tiny_chat, tmp_path / "b", "--teacher", tmp_path)) == 1
    assert "Feature distillation takes one --teacher" in capsys.readouterr().err


def test_two_ranks_give_the_single_process_gradients(tiny_teacher_dir, tiny_chat, tmp_path):
    """DDP with the projectors on the student: 2 ranks x batch 2 == 1 process x batch 4, projectors included."""
    from train_args import make_plan

    from lmdistill.train.loop import Trainer

    out = tmp_path / "grads.pt"
    argv = _argv(tiny_teacher_dir, tiny_chat, tmp_path / "ddp", "--device", "cpu")[1:]
    proc = torchrun("ddp_worker.py", out, "distill", [*argv, "--batch_size", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    single = Trainer(make_plan("distill", _argv(tiny_teacher_dir, tiny_chat, tmp_path / "one", "--device", "cpu")[1:]))
    single.accumulate(single.micro_batches(0))
    ref = {n: p.grad for n, p in single.acc.unwrap_model(single.model).named_parameters() if p.grad is not None}
    assert any("feature_projectors" in n for n in ddp) and set(ddp) == set(ref)
    for name in ref:
        torch.testing.assert_close(ddp[name], ref[name], rtol=1e-4, atol=1e-6)
