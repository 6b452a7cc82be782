"""The quickstart's stages, each through the toolkit's own pieces: data -> tokenizer -> teacher -> two students
-> evaluation. `summary.py` turns the results into `results.json`, plots and `report.md`.

Every stage writes into one output folder:

    data/        teacher_train.jsonl, student_train.jsonl (the students' 20%), heldout_text.jsonl, heldout_qa.jsonl
    tokenizer/   byte-level BPE trained on the training split (`lmdistill.tokenizer.train_tokenizer`)
    teacher/     `lmdistill train` run: micro's width with 2 layers (256 x 2) on all the training data
    student_ce/  `lmdistill train` run: nano (128 x 2), cross-entropy on the 20%
    student_kd/  `lmdistill distill` run: nano, same steps, seed and 20%, forward KL to the teacher
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lmdistill.quickstart import corpus

MODELS = ("teacher", "student_ce", "student_kd")


@dataclass(frozen=True)
class Recipe:
    """Sizes and steps, chosen to fit ~3.5 minutes on 2 CPU cores (see the package docstring)."""

    people: int = 48
    documents: int = 1200
    sentences: int = 12
    qa_repeats: int = 4
    heldout_fraction: float = 0.5  # of the (person, topic) pairs: their questions are held out
    heldout_documents: int = 100
    student_fraction: float = 0.2
    vocab_size: int = 2048  # requested; the corpus has merges for fewer: 708 tokens at seed 0 (704-716, seeds 0-3)
    teacher: str = "micro"
    teacher_layers: int = 2  # micro's width with 2 layers: twice the steps of 4 layers in the same time
    teacher_steps: int = 900
    student: str = "nano"
    student_steps: int = 400
    batch_size: int = 8
    max_seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_iters: int = 20
    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    max_new_tokens: int = 16

    def scaled(self, steps_scale: float) -> "Recipe":
        """All step counts times `steps_scale` (at least 2 steps each)."""
        steps = [max(2, round(n * steps_scale)) for n in (self.teacher_steps, self.student_steps)]
        return replace(self, teacher_steps=steps[0], student_steps=steps[1],
                       warmup_iters=min(self.warmup_iters, max(1, min(steps) // 4)))


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, stage: str, text: str) -> None:
        print(f"[{self():6.1f}s] {stage}: {text}", flush=True)


# -- data and tokenizer ----------------------------------------------------------------------------------
def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _as_text(tokenizer, conversation: list[dict]) -> str:
    """A conversation as plain text in the chat template, minus the final end-of-turn: the plain-text loader
    appends EOS (`<|im_end|>`) to every document, so question and answer are trained exactly as rendered."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    return text[: text.rindex(tokenizer.eos_token)]


def make_data(out: Path, recipe: Recipe, seed: int, clock: Clock) -> dict:
    """Generate the world and its splits, train the tokenizer, write the data files; returns their facts."""
    from lmdistill.tokenizer import train_tokenizer

    world = corpus.make_world(seed, recipe.people, recipe.heldout_fraction)
    split = corpus.generate(world, seed, recipe.documents, recipe.sentences, recipe.qa_repeats,
                            recipe.heldout_documents)
    # The tokenizer sees the training split only, with the chat roles so they become single tokens.
    qa_texts = [f"user\n{q['content']}\nassistant\n{a['content']}" for q, a in split.train_qa]
    tokenizer = train_tokenizer(texts=split.train_text + qa_texts, vocab_size=recipe.vocab_size,
                                output_dir=out / "tokenizer")
    clock.say("tokenizer", f"byte-level BPE with {len(tokenizer):,} tokens -> {out / 'tokenizer'}")
    # Questions go into the text stream: every token trains, as in pretraining; the students get a random 20%.
    docs = split.train_text + [_as_text(tokenizer, qa) for qa in split.train_qa]
    random.Random(f"mix-{seed}").shuffle(docs)
    n_student = round(len(docs) * recipe.student_fraction)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {name: data / f"{name}.jsonl" for name in ("teacher_train", "student_train", "heldout_text", "heldout_qa")}
    _write_jsonl(paths["teacher_train"], [{"text": d} for d in docs])
    _write_jsonl(paths["student_train"], [{"text": d} for d in docs[:n_student]])
    _write_jsonl(paths["heldout_text"], [{"text": d} for d in split.heldout_text])
    _write_jsonl(paths["heldout_qa"], [{"conversations": qa} for qa in split.heldout_qa])
    facts = {"people": len(world.people), "topics": len(corpus.TOPICS), "documents": len(split.train_text),
             "train_questions": len(split.train_qa), "student_records": n_student, "teacher_records": len(docs),
             "heldout_documents": len(split.heldout_text), "heldout_questions": len(split.heldout_qa),
             "tokenizer_size": len(tokenizer), "paths": {k: str(v) for k, v in paths.items()}}
    clock.say("data", f"{len(world.people)} people x {len(corpus.TOPICS)} habits; {len(split.train_text):,} documents "
              f"+ {len(split.train_qa):,} questions for the teacher, {n_student:,} of these {len(docs):,} records "
              f"({recipe.student_fraction:.0%}) for the students; held out: {len(split.heldout_text)} documents, "
              f"{len(split.heldout_qa)} questions -> {data}")
    return facts


# -- training ------------------------------------------------------------------------------------------
def run_training(config) -> float:
    """One Trainer run of a `TrainConfig`/`DistillConfig`; returns its seconds. A Ctrl-C that stopped the run
    stops the quickstart too."""
    from lmdistill.api import plan
    from lmdistill.train.loop import Trainer

    start = time.perf_counter()
    trainer = Trainer(plan(config))
    try:
        trainer.train()  # restores the caller's SIGINT/SIGTERM handlers when it returns
    finally:
        trainer.close()
    if trainer.stop_signal:
        raise KeyboardInterrupt
    return time.perf_counter() - start


def common_options(recipe: Recipe, seed: int, device: str, steps: int, data: Path, out: Path) -> dict:
    """The options every quickstart run shares (fields of `TrainConfig` and `DistillConfig`)."""
    return dict(data=str(data), output_dir=str(out), max_steps=steps, batch_size=recipe.batch_size,
                max_seq_len=recipe.max_seq_len, learning_rate=recipe.learning_rate, warmup_iters=recipe.warmup_iters,
                seed=seed, device=device, log_interval=max(1, steps // 40))


def train_models(out: Path, recipe: Recipe, seed: int, device: str, clock: Clock) -> dict[str, dict]:
    """Teacher on all the training data, then two students on the same 20% with the same steps and seed."""
    from lmdistill.api import DistillConfig, TrainConfig

    data, tok = out / "data", str(out / "tokenizer")
    runs = {
        "teacher": (TrainConfig, recipe.teacher_steps, data / "teacher_train.jsonl",
                    dict(model=recipe.teacher, num_layers=recipe.teacher_layers, tokenizer=tok)),
        "student_ce": (TrainConfig, recipe.student_steps, data / "student_train.jsonl",
                       dict(model=recipe.student, tokenizer=tok)),
        "student_kd": (DistillConfig, recipe.student_steps, data / "student_train.jsonl",
                       dict(teacher=[str(out / "teacher")], student=recipe.student, divergence=recipe.divergence,
                            temperature=recipe.temperature, alpha=recipe.alpha)),
    }
    what = {"teacher": f"{recipe.teacher} with {recipe.teacher_layers} layers, all the training data",
            "student_ce": f"{recipe.student}, cross-entropy on {recipe.student_fraction:.0%} of it",
            "student_kd": f"{recipe.student}, {recipe.divergence} to the teacher (T={recipe.temperature:g}, "
                          f"alpha={recipe.alpha:g}) on the same {recipe.student_fraction:.0%}"}
    info = {}
    for name, (config, steps, path, extra) in runs.items():
        clock.say(name, f"`lmdistill {config.command}` {what[name]}, {steps} steps")
        seconds = run_training(config(**common_options(recipe, seed, device, steps, path, out / name), **extra))
        info[name] = {"train_steps": steps, "train_seconds": round(seconds, 1)}
        clock.say(name, f"trained in {seconds:.1f}s -> {out / name}")
    return info


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate_models(out: Path, recipe: Recipe, device: str, clock: Clock) -> dict[str, dict]:
    """Held-out LM metrics (students also against the teacher) and exact match on the held-out questions."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from lmdistill.data import load_examples
    from lmdistill.eval import evaluate_lm, evaluate_task, load_task_records
    from lmdistill.models import count_parameters
    from lmdistill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer")
    examples = load_examples(out / "data" / "heldout_text.jsonl", tokenizer, recipe.max_seq_len)
    records = load_task_records(out / "data" / "heldout_qa.jsonl")
    def load(name: str):
        return AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).to(device).eval()

    teacher = load("teacher")
    results = {}
    for name in MODELS:
        model = teacher if name == "teacher" else load(name)
        lm = evaluate_lm(model, examples, tokenizer, None if model is teacher else teacher, batch_size=16,
                         device=device)
        task = evaluate_task(model, tokenizer, records, task="exact_match", max_new_tokens=recipe.max_new_tokens,
                             batch_size=32, device=device, progress=sys.stderr.isatty(), description=name,
                             num_samples=len(records))  # the report draws its examples from all of them
        results[name] = {
            "ce": lm["ce"], "ppl": lm["ppl"], "bits_per_byte": lm["bits_per_byte"],
            **({"kl_to_teacher": lm["kl_to_teacher"], "agreement": lm["agreement"]} if "kl_to_teacher" in lm else {}),
            "accuracy": task["accuracy"], "ci95": [task["ci95_low"], task["ci95_high"]], "correct": task["correct"],
            "questions": task["n"], "heldout_tokens": lm["tokens"], "params": count_parameters(model)[0],
            "samples": task["samples"],
        }
        clock.say("eval", f"{name}: held-out CE {lm['ce']:.3f} (ppl {lm['ppl']:.2f}), exact match "
                  f"{task['correct']}/{task['n']} = {task['accuracy']:.1%}")
    return results
