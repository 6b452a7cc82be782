"""Training health (issue 14): --keep_best, early stopping, exact resume of both, and each warning on a tiny model
built to show its condition (a handful of examples to overfit, a JSD student from random init on a two-answer task,
a learning rate that explodes, a dead model, a confidently wrong model, a random teacher); a healthy run warns of
nothing."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from train_args import make_plan

from lmdistill.cli import main
from lmdistill.train import health
from lmdistill.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(out, kind=None) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["type"] == kind]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train(command, argv) -> tuple[int, str]:
    """One in-process run; (exit status of train(), what it printed)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = Trainer(make_plan(command, argv)).train()
    return code, text.getvalue()


# -- overfitting a handful of examples: the warning, --keep_best, early stopping, resume -------------------------
@pytest.fixture(scope="module")
def handful(tmp_path_factory, tiny_chat):
    """4 dialogs to overfit and 20 held-out ones (tiny_chat's)."""
    lines = tiny_chat.read_text().splitlines()
    folder = tmp_path_factory.mktemp("handful")
    (folder / "few.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (folder / "held.jsonl").write_text("\n".join(lines[20:]) + "\n")
    return folder


def _overfit_argv(tokenizer, data, out, *extra):
    return ["--model", "nano", "--hidden_size", 64, "--num_layers", 2, "--tokenizer", tokenizer,
            "--data", data / "few.jsonl", "--eval_data", data / "held.jsonl", "--eval_interval", 5, "--max_steps", 60,
            "--batch_size", 4, "--learning_rate", 1e-2, "--max_seq_len", 64, "--log_interval", 5, "--output_dir", out,
            "--keep_best", "--early_stopping_patience", 4, "--keep_checkpoints", 1, *extra]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, tiny_tokenizer_dir, handful):
    out = tmp_path_factory.mktemp("overfit") / "run"
    code, printed = _train("train", _overfit_argv(tiny_tokenizer_dir, handful, out))
    assert code == 0
    return out, printed


def test_overfitting_warns_keep_best_exports_the_best_checkpoint_and_stops_early(overfit_run):
    out, printed = overfit_run
    warnings = _records(out, "health")
    assert "overfitting" in [w["check"] for w in warnings]
    over = next(w for w in warnings if w["check"] == "overfitting")
    assert over["eval_ce"][1] > over["eval_ce"][0] and over["train_loss"][1] < over["train_loss"][0]
    assert "overfitting the training data" in over["message"] and "--keep_best" in over["message"]
    assert "warning (overfitting)" in printed

    evals = {r["step"]: r["ce"] for r in _records(out, "eval")}
    best_step = _records(out, "best")[-1]["step"]
    assert evals[best_step] == min(evals.values())
    (stop,) = _records(out, "early_stop")
    assert stop["best_step"] == best_step and stop["step"] == best_step + 4 * 5 < 60  # patience 4 x interval 5
    assert max(r["step"] for r in _records(out, "train")) == stop["step"]  # nothing trained after the stop
    assert f"early stopping at step {stop['step']}" in printed

    (final,) = _records(out, "final")
    assert final["exported_step"] == best_step and final["last_step"] == stop["step"]
    # the exported model is the best checkpoint's; the last one stays in its folder; rotation (--keep_checkpoints
    # 1) kept the best
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted([f"checkpoint-{best_step}",
                                                                       f"checkpoint-{stop['step']}"])
    exported = _weights(out)
    assert _same_weights(exported, _weights(out / f"checkpoint-{best_step}"))
    assert not _same_weights(exported, _weights(out / f"checkpoint-{stop['step']}"))


def test_report_tells_which_step_was_kept_and_why(overfit_run, tmp_path):
    from lmdistill.report import read_metrics, write_report

    out, _ = overfit_run
    metrics = read_metrics(out)
    assert {e["type"] for e in metrics["events"]} >= {"best", "early_stop", "final", "health"}
    text = write_report({"overfit": metrics}, tmp_path).read_text()
    best_step = _records(out, "final")[0]["exported_step"]
    assert "## Training health" in text
    assert f"- overfit: exported the model of step {best_step} (best eval ce" in text
    assert "- overfit: early stopping at step" in text and "(overfitting): held-out CE rose" in text


def test_best_value_and_patience_survive_resume(overfit_run, tiny_tokenizer_dir, handful, tmp_path, monkeypatch):
    straight, _ = overfit_run
    best_step = _records(straight, "final")[0]["exported_step"]
    out = tmp_path / "run"
    argv = _overfit_argv(tiny_tokenizer_dir, handful, out)
    # stopped between the best evaluation and the early stop: two evaluations without improvement so far
    monkeypatch.setenv("LMDISTILL_SIGTERM_AT_STEP", str(best_step + 12))
    assert _train("train", argv)[0] == 143
    monkeypatch.delenv("LMDISTILL_SIGTERM_AT_STEP")
    state = torch.load(out / f"checkpoint-{best_step + 12}" / "training_state.pt", weights_only=False)["health"]
    assert state["best_step"] == best_step and state["bad_evals"] == 2
    code, printed = _train("train", argv + ["--resume"])
    assert code == 0 and "resumed from" in printed

    def events(run):
        return [{k: v for k, v in r.items() if k not in ("message",)} for r in _records(run)
                if r["type"] in ("best", "early_stop", "final", "health")]

    got, want = events(out), events(straight)
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    for a, b in zip(got, want):
        for k, v in b.items():
            numeric = isinstance(v, float) or isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
            assert a[k] == (pytest.approx(v, rel=1e-5) if numeric else v), (b["type"], k)
    exported, expected = _weights(out), _weights(straight)
    for k in expected:
        torch.testing.assert_close(exported[k], expected[k], rtol=1e-5, atol=1e-6)


# -- a bounded divergence from a random student on a two-answer task -----------------------------------------
YES_SHARE, TEACHER_STEPS = 0.2, 100
@pytest.fixture(scope="module")
def two_answers(tmp_path_factory):
    """Reviews whose one sentiment word decides the answer ("yes" for a fifth, "no" otherwise), a tokenizer and a
    teacher trained on them until it answers every held-out review right."""
    from lmdistill.tokenizer import train_tokenizer

    folder, rng = tmp_path_factory.mktemp("two_answers"), random.Random(0)
    good, bad = ["great", "lovely", "superb", "fine", "nice", "happy"], ["awful", "bad", "poor", "sad", "ugly", "dull",
                                                                        "boring", "nasty", "weak", "grim", "sour"]
    filler = ["the", "food", "room", "staff", "was", "very", "and", "place", "it", "our", "stay", "view"]

    def record():
        yes = rng.random() < YES_SHARE
        words = [rng.choice(filler) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(good if yes else bad))
        return {"conversations": [{"role": "user", "content": "review: " + " ".join(words)},
                                  {"role": "assistant", "content": "yes" if yes else "no"}]}

    for name, n in (("train", 200), ("held", 64)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(record()) + "\n" for _ in range(n)))
    texts = [json.loads(x)["conversations"][0]["content"] + " yes no"
             for x in (folder / "train.jsonl").read_text().splitlines()]
    train_tokenizer(texts=texts, vocab_size=300, output_dir=folder / "tok")
    code, _ = _train("train", ["--model", "nano", "--hidden_size", 64, "--num_layers", 2, "--tokenizer",
                               folder / "tok", "--data", folder / "train.jsonl", "--output_dir", folder / "teacher",
                               "--max_steps", TEACHER_STEPS, "--batch_size", 16, "--learning_rate", 1e-2,
                               "--max_seq_len", 64])
    assert code == 0
    return folder


def _student_argv(folder, out, divergence, *extra):
    return ["--teacher", folder / "teacher", "--student", "nano", "--hidden_size", 64, "--num_layers", 2,
            "--data", folder / "train.jsonl", "--eval_data", folder / "held.jsonl", "--output_dir", out,
            "--divergence", divergence, "--max_steps", 120, "--batch_size", 16, "--learning_rate", 3e-3,
            "--max_seq_len", 64, "--log_interval", 20, "--eval_interval", 40, *extra]


def test_jsd_from_a_random_student_warns_that_the_kd_loss_plateaued(two_answers, tmp_path):
    out = tmp_path / "jsd"
    code, printed = _train("distill", _student_argv(two_answers, out, "jsd"))
    assert code == 0
    (warning,) = [w for w in _records(out, "health") if w["check"] == "kd_plateau"]
    assert warning["divergence"] == "jsd" and warning["kd_loss"] >= health.PLATEAU_SHARE * math.log(2)
    assert "--divergence forward_kl" in warning["message"] and "--alpha" in warning["message"]
    assert "--temperature_end" in warning["message"]
    assert "warning (kd_plateau)" in printed
    assert _records(out, "eval")[-1]["agreement"] < 0.97  # the student is indeed stuck


def test_a_healthy_run_warns_of_nothing_and_keep_best_works_for_distill(two_answers, tmp_path):
    out = tmp_path / "fkl"
    code, printed = _train("distill", _student_argv(two_answers, out, "forward_kl", "--keep_best", "kl_to_teacher"))
    assert code == 0
    assert _records(out, "health") == [] and "warning" not in printed
    evals = _records(out, "eval")
    assert evals[-1]["agreement"] > 0.97 and evals[-1]["teacher_ce"] < evals[-1]["ce"]
    (final,) = _records(out, "final")
    best = min(evals, key=lambda r: r["kl_to_teacher"])["step"]
    assert final["exported_step"] == best and final["metric"] == "kl_to_teacher"
    assert _same_weights(_weights(out), _weights(out / f"checkpoint-{best}"))


# -- gradients, collapse, a teacher worse than its student -----------------------------------------------------
def test_exploding_gradients_warn(tiny_tokenizer_dir, handful, tmp_path):
    out = tmp_path / "explode"
    argv = ["--model", "nano", "--hidden_size", 64, "--num_layers", 2, "--tokenizer", tiny_tokenizer_dir,
            "--data", handful / "few.jsonl", "--output_dir", out, "--max_steps", 50, "--batch_size", 4,
            "--learning_rate", 3.0, "--warmup_iters", 40, "--max_seq_len", 64]
    code, printed = _train("train", argv)
    assert code == 0  # a warning, not a failure
    (warning,) = [w for w in _records(out, "health") if w["check"] == "grad_explode"]
    assert warning["grad_norm"] > 10 * warning["smallest_before"] and "--learning_rate" in warning["message"]


def test_vanishing_gradients_stop_a_strict_run(tiny_tokenizer_dir, handful, tmp_path, capsys):
    from transformers import AutoTokenizer

    from lmdistill.models import load_model

    dead = tmp_path / "dead"  # every weight zero: the hidden states, logits and all gradients are exactly 0
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    model = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=1, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(dead)
    tok.save_pretrained(dead)
    out = tmp_path / "run"
    code = main(["train", "--model", str(dead), "--data", str(handful / "few.jsonl"), "--output_dir", str(out),
                 "--max_steps", "40", "--batch_size", "4", "--max_seq_len", "64", "--strict_health"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--strict_health: stopped after step 20: gradient norms have vanished" in err
    (warning,) = _records(out, "health")
    assert warning["check"] == "grad_vanish" and warning["step"] == 20
    assert (out / "checkpoint-20" / "training_state.pt").is_file() and not (out / "model.safetensors").exists()


def test_a_confidently_wrong_model_warns_of_collapse(tiny_tokenizer_dir, handful, tmp_path):
    from transformers import AutoTokenizer

    from lmdistill.models import load_model

    sharp = tmp_path / "sharp"  # random weights, logits x 300: near-certain of random tokens
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = load_model("nano", tokenizer=tok, hidden_size=32, num_layers=1, verbose=False)
    with torch.no_grad():
        model.model.norm.weight.mul_(300)
    model.save_pretrained(sharp)
    tok.save_pretrained(sharp)
    out = tmp_path / "run"
    code, printed = _train("train", ["--model", sharp, "--data", handful / "few.jsonl", "--eval_data",
                                     handful / "held.jsonl", "--output_dir", out, "--max_steps", 2, "--batch_size", 4,
                                     "--learning_rate", 1e-12, "--max_seq_len", 64, "--eval_interval", 1])
    assert code == 0
    (warning,) = _records(out, "health")
    assert warning["check"] == "collapse" and warning["entropy"] < 0.1 < 1.0 < warning["eval_ce"]
    assert "confidently wrong" in printed


def test_a_teacher_worse_than_the_student_is_marked(tiny_teacher_dir, tiny_chat, handful, tmp_path, capsys):
    out = tmp_path / "kd"
    code, printed = _train("distill", ["--teacher", tiny_teacher_dir, "--student", "nano", "--hidden_size", 32,
                                       "--num_layers", 1, "--data", tiny_chat, "--eval_data", handful / "held.jsonl",
                                       "--output_dir", out, "--max_steps", 20, "--batch_size", 8, "--alpha", 1.0,
                                       "--learning_rate", 1e-2, "--max_seq_len", 64, "--eval_interval", 10])
    assert code == 0  # the random teacher is soon worse than a student trained on the labels
    (warning,) = _records(out, "health")
    assert warning["check"] == "teacher_worse" and warning["teacher_ce"] > warning["eval_ce"]
    assert "distilling further pulls the student toward the worse model" in printed
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--teacher", str(tiny_teacher_dir), "--data",
                 str(handful / "held.jsonl"), "--output_dir", str(tmp_path / "eval")]) == 0
    assert f"the teacher {tiny_teacher_dir} is worse than {out} on this data" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())[str(out)]
    assert result["teacher_worse"] is True and result["teacher_ce"] > result["ce"]


# -- options that cannot work fail before anything loads ---------------------------------------------------------
@pytest.mark.parametrize("command, extra, message", [
    ("train", ["--keep_best"], "--keep_best: chooses by held-out metrics; it needs --eval_data FILE"),
    ("train", ["--early_stopping_patience", "3"], "--early_stopping_patience: chooses by held-out metrics"),
    ("train", ["--keep_best", "--eval_data", "HELD"], "with --eval_interval 0 the run evaluates only at its end"),
    ("train", ["--keep_best", "acc", "--eval_data", "HELD", "--eval_interval", "5"],
     "--keep_best acc: not an eval metric this run logs with a known direction; expected one of ce, ppl, "
     "bits_per_byte."),
    ("train", ["--keep_best", "agreement", "--eval_data", "HELD", "--eval_interval", "5"],
     "(KL and agreement need a teacher"),
    ("distill", ["--keep_best", "entropy", "--eval_data", "HELD", "--eval_interval", "5"],
     "expected one of ce, ppl, bits_per_byte, kl_to_teacher, agreement."),
    ("train", ["--early_stopping_min_delta", "0.1"], "add --early_stopping_patience K"),
])
def test_invalid_options_fail_fast(command, extra, message, tiny_teacher_dir, handful, tmp_path, capsys):
    models = (["--teacher", str(tiny_teacher_dir), "--student", "nano"] if command == "distill"
              else ["--model", "nano", "--tokenizer", str(tiny_teacher_dir)])
    extra = [str(handful / "held.jsonl") if x == "HELD" else x for x in extra]
    out = tmp_path / "run"
    assert main([command, *models, "--data", str(handful / "few.jsonl"), "--output_dir", str(out), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()  # a failed start writes nothing


# -- the checks on their own ----------------------------------------------------------------------------------
def test_overfitting_needs_held_out_ce_rising_while_the_training_loss_falls():
    rising = [[5, 3.0, 2.0], [10, 3.1, 1.5], [15, 3.2, 1.0], [20, 3.3, 0.5]]
    assert health.overfitting(rising)["steps"] == [5, 20]
    assert health.overfitting(rising[1:]) is None  # too few evaluations
    assert health.overfitting([[s, ce, 2.0 + i] for i, (s, ce, _) in enumerate(rising)]) is None  # train rises too
    assert health.overfitting([[5, 3.0, 2.0], [10, 3.1, 1.5], [15, 3.05, 1.0], [20, 3.3, 0.5]]) is None


def test_kd_plateau_and_gradient_checks_on_sequences():
    flat = [0.30, 0.08, 0.075, 0.074, 0.076, 0.075]
    assert health.kd_plateau(flat, "jsd", math.log(2), 10, 0.0, None)["kd_loss"] == 0.075
    assert health.kd_plateau([0.3, 0.2, 0.1, 0.05, 0.03], "jsd", math.log(2), 10, 0.0, None) is None  # still falling
    assert health.kd_plateau([0.02] * 6, "jsd", math.log(2), 10, 0.0, None) is None  # plateau near zero: fine
    assert health.gradients([1.0, 0.8, 12.0], 2.0, 5.0)["check"] == "grad_explode"
    assert health.gradients([1.0, 0.8, 1.5], 2.0, 5.0) is None
    assert health.gradients([1.0, 0.5, 1e-6], 4.0, 5.0)["check"] == "grad_vanish"
    assert health.gradients([1.0, 0.5, 1e-6], 0.01, 5.0) is None  # learned: small gradients are expected


def test_health_state_round_trips_and_reads_the_older_positional_format():
    from types import SimpleNamespace

    from lmdistill.losses.engine import KDConfig
    from lmdistill.train.plan import Objective

    plan = SimpleNamespace(health=SimpleNamespace(keep_best="ce", patience=3, min_delta=0.0, strict=False),
                           objective=Objective("kd", KDConfig("jsd")))
    trainer = SimpleNamespace(global_step=0)
    a = health.Health(plan, 100, True, True)
    for i in range(23):
        trainer.global_step = i + 1
        a.on_step(trainer, {"loss": 3.0 - 0.01 * i, "kd_loss": 0.1 + 0.001 * i, "grad_norm": 1.0 + 0.1 * (i % 4)})
    saved = a.state_dict()
    assert isinstance(saved, dict) and saved["since_eval_steps"] == 23 and len(saved["grad_medians"]) == 2
    assert saved["grad_norms"] == pytest.approx([1.0, 1.1, 1.2]) and len(saved["kd_windows"]) == 4  # windows of 5
    assert saved["kd_steps"] == 3 and saved["since_eval_loss"] == pytest.approx(sum(3.0 - 0.01 * i for i in range(23)))
    b = health.Health(plan, 100, True, True)
    b.load_state_dict(saved)
    assert b.state == a.state and b.state_dict() == saved
    for h in (a, b):  # both continue the same way
        trainer.global_step = 24
        h.on_step(trainer, {"loss": 2.5, "kd_loss": 0.1, "grad_norm": 1.0})
    assert a.state == b.state

    old = {"metric": "ce", "best_value": 2.5, "best_step": 20, "bad_evals": 1, "stopped_at": None,
           "evals": [[10, 2.6, 3.0], [20, 2.5, 2.9]], "since_eval": [5.5, 2], "kd": [0.3, 3, [0.2, 0.1]],
           "grad": [[1.0, 2.0], [1.5], [3.0, 2.9], 3.1], "warned": ["kd_plateau"],
           "last_eval": {"ce": 2.5, "agreement": None, "teacher_ce": None}, "last_value": [20, 2.5]}
    c = health.Health(plan, 100, True, True)
    c.load_state_dict(old)
    assert c.state == health.HealthState(
        "ce", best_value=2.5, best_step=20, bad_evals=1, last_value_step=20, last_value=2.5,
        last_eval={"ce": 2.5, "agreement": None, "teacher_ce": None}, evals=[[10, 2.6, 3.0], [20, 2.5, 2.9]],
        since_eval_loss=5.5, since_eval_steps=2, kd_loss_sum=0.3, kd_steps=3, kd_windows=[0.2, 0.1],
        grad_norms=[1.0, 2.0], grad_losses=[3.0, 2.9], grad_medians=[1.5], grad_reference_loss=3.1,
        warned=["kd_plateau"])
    other = health.Health(SimpleNamespace(health=SimpleNamespace(keep_best="bits_per_byte", patience=3, min_delta=0.0,
                                                                 strict=False), objective=plan.objective),
                          100, True, True)
    other.load_state_dict(old)  # --keep_best changed on resume: its record starts over, the checks' windows stay
    assert (other.state.metric, other.state.best_step, other.state.bad_evals) == ("bits_per_byte", None, 0)
    assert other.state.since_eval_steps == 2 and other.state.warned == ["kd_plateau"]

def test_metric_directions_and_divergence_bounds():
    assert [health.direction(m) for m in ("ce", "ppl", "bits_per_byte", "kl_to_teacher_2", "agreement",
                                          "exact_match", "entropy")] == ["min"] * 4 + ["max"] * 2 + [None]
    from lmdistill.losses.engine import KDConfig
    from lmdistill.train.plan import Objective

    assert health.kd_bound(Objective("kd", KDConfig("jsd", jsd_beta=0.5))) == ("jsd", pytest.approx(math.log(2)))
    bound = health.kd_bound(Objective("kd", KDConfig("srkl", skew_lambda=0.1)))
    assert bound == ("skew_reverse_kl", pytest.approx(-math.log(0.1)))
    assert health.kd_bound(Objective("kd", KDConfig("forward_kl"))) is None
    assert health.kd_bound(Objective("minillm", KDConfig("jsd"))) is None
    assert health.metric_name(True) == "ce" and health.metric_name(" agreement ") == "agreement"


def test_keep_best_and_early_stopping_agree_across_two_ranks(tiny_tokenizer_dir, handful, tmp_path):
    """Under torchrun (2 CPU ranks, DDP on gloo) every rank takes the same decisions from the broadcast eval: the run
    stops early at the same step, finishes (no rank left waiting), and exports the best checkpoint's weights."""
    import subprocess
    import sys

    from runs import free_port

    out = tmp_path / "run"
    argv = _overfit_argv(tiny_tokenizer_dir, handful, out, "--device", "cpu")
    argv[argv.index("--batch_size") + 1] = 2  # 2 ranks x 2 = the single-process run's 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lmdistill", "train", *map(str, argv)]
    proc = subprocess.run(cmd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best_step = _records(out, "best")[-1]["step"]
    (stop,) = _records(out, "early_stop")
    (final,) = _records(out, "final")
    assert stop["best_step"] == best_step and final["exported_step"] == best_step
    assert _same_weights(_weights(out), _weights(out / f"checkpoint-{best_step}"))
