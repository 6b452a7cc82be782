"""Does on-policy distillation help? The quickstart's world (data, tokenizer, teacher, evaluation), five ways to
train the same student at equal budget, three seeds.

    python benchmarks/on_policy_seeds.py                        # seeds 0 1 2 -> benchmarks/results/on_policy_seeds.json
    python benchmarks/on_policy_seeds.py --seeds 0 --steps_scale 0.05 --output /tmp/smoke.json   # smoke run

Per seed: `pipeline.make_data` (world, splits, tokenizer), then `pipeline.train_models` (the quickstart's own
teacher, CE student and forward-KL student), then the other arms, then `pipeline.evaluate_models` on every model
(held-out perplexity on documents, exact match on held-out questions with its 95% Wilson interval). Every arm is
the `nano` student, trained from scratch with the quickstart's batch size, sequence length, learning rate, warmup
and seed, for the same total number of optimizer steps S (`Recipe.student_steps`, 400 at scale 1):

    ce      cross-entropy on the students' 20% (text + questions)                 -- the quickstart's
    kd      forward KL to the teacher, alpha 0, on the same 20%                   -- the quickstart's
    seqkd   sequence-level KD (Kim & Rush 2016): the teacher writes (greedy, `lmdistill generate`) the answer to
            every question of the 20%; CE on the 20% with those answers in place of the dataset's
    kd_qa   control for the two below: KD on the 20% for S - S2 steps, then S2 steps of off-policy forward KL
            on the 20%'s questions (dataset answers)
    gkd     the same first phase, then S2 steps of GKD on the questions: on_policy_fraction 0.5, JSD beta 0.5
    rkl     the same first phase, then S2 steps of on-policy reverse KL on the questions: on_policy_fraction 1
    minillm the same first phase, then S2 steps of MiniLLM on the questions (`--method minillm`, teacher-mixed
            sampling alpha 0.2, lm_coef 1: CE on the questions' dataset answers beside the policy gradient)

Why the on-policy arms have two phases. The quickstart's student file is plain text: its question/answer pairs are
rendered into the chat template and written as `{"text": ...}` records, so `load_examples` packs the whole file
into 128-token blocks in which every token is trained. `train.on_policy.last_prompt` of such a block is the tokens
before its last trained span -- here none (every token is trained), an empty prompt. When this was measured a GKD
step on it stopped in `generate_replies` ("an empty prompt"); since ed1bf6c such blocks stay off-policy, but a data
file still has one record shape (`load_examples` refuses a text file with conversation records), so the questions
cannot be conversations beside the documents in one run. At on_policy_fraction 1 `prompt_examples` refuses the file
("a plain-text record has no prompt"). A block is not a prompt anyway: it cuts documents and questions at arbitrary
points. So on-policy steps get the only records that are prompts: the 20%'s question/answer pairs, recovered from
the file (each text that round-trips through the quickstart's rendering, `pipeline._as_text`) and written as
conversations. But the world's knowledge -- people's habits, which the held-out questions ask about -- is in the
documents; a student trained on the questions alone never sees it. So the on-policy arms first get what the `kd`
arm gets (off-policy KD on the whole 20%) for S - S2 steps -- one shared run per seed, as GKD starts from a trained
student -- and then spend their last S2 = `--phase2_share` x S steps on-policy on the questions. `kd_qa` spends
those S2 steps off-policy on the same questions, so gkd/rkl vs kd_qa isolates on-policy vs off-policy; kd (S steps
on the 20%) is the reference without a question-only phase. Phase 2 is a new run from phase 1's weights: same
learning rate, its own warmup and cosine decay, a fresh optimizer; the same for the three.

Wall seconds of each run are recorded (phase 1 counted once per arm it feeds); on-policy steps also log the
mean completion length and cut share. Nothing else should run on the cores meanwhile (see the README).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ARMS = ("ce", "kd", "seqkd", "kd_qa", "gkd", "rkl", "minillm")
EXTRA_ARMS = ARMS[2:]  # ce and kd come with the teacher (`pipeline.train_models`), always
PHASE2 = {  # DistillConfig fields of each arm's second phase, on the questions
    "kd_qa": dict(divergence="forward_kl", on_policy_fraction=0.0),
    "gkd": dict(divergence="jsd", jsd_beta=0.5, on_policy_fraction=0.5),
    "rkl": dict(divergence="reverse_kl", on_policy_fraction=1.0),
    "minillm": dict(method="minillm", teacher_mix_alpha=0.2, lm_coef=1.0),
}
ON_POLICY = ("gkd", "rkl", "minillm")  # each compared with kd_qa, its off-policy control
QA_TEXT = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*)", re.DOTALL)


def folder(arm: str) -> str:
    return f"student_{arm}"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def student_questions(out: Path, tokenizer) -> tuple[list[dict], list[list[dict] | None]]:
    """The students' records and, per record, its conversation when it is a rendered question (else None)."""
    from lmdistill.quickstart.pipeline import _as_text

    records = [json.loads(line) for line in (out / "data" / "student_train.jsonl").read_text().splitlines()]
    conversations = []
    for number, r in enumerate(records, 1):
        m = QA_TEXT.fullmatch(r["text"])
        qa = m and [{"role": "user", "content": m[1]}, {"role": "assistant", "content": m[2]}]
        if r["text"].startswith("<|im_start|>") and not (qa and _as_text(tokenizer, qa) == r["text"]):
            raise RuntimeError(f"{out}/data/student_train.jsonl:{number}: a chat-rendered record that does not "
                               "round-trip through pipeline._as_text; the quickstart's rendering changed")
        conversations.append(qa or None)
    return records, conversations


def seqkd_data(out: Path, recipe, seed: int, device: str, records, conversations, tokenizer) -> dict:
    """The teacher answers (greedy) every question of the 20% with `lmdistill generate`; the students' file with
    those answers in place of the dataset's -> data/student_seqkd.jsonl."""
    from lmdistill.cli import main as cli
    from lmdistill.quickstart.pipeline import _as_text

    prompts, replies = out / "data" / "student_qa.jsonl", out / "data" / "teacher_replies.jsonl"
    start = time.perf_counter()
    code = cli(["generate", "--model", str(out / "teacher"), "--prompts", str(prompts), "--output_file", str(replies),
                "--temperature", "0", "--max_new_tokens", str(recipe.max_new_tokens), "--batch_size", "32",
                "--seed", str(seed), "--device", device])
    if code:
        raise RuntimeError(f"lmdistill generate failed (exit status {code})")
    seconds = time.perf_counter() - start
    answer = {}
    for line in replies.read_text().splitlines():
        user, reply = json.loads(line)["conversations"]
        answer[user["content"]] = reply["content"]  # greedy: one reply per distinct question
    texts, changed = [], 0
    for r, qa in zip(records, conversations):
        if qa is None:
            texts.append(r)
            continue
        new = [qa[0], {"role": "assistant", "content": answer[qa[0]["content"]]}]
        changed += new[1]["content"] != qa[1]["content"]
        texts.append({"text": _as_text(tokenizer, new)})
    write_jsonl(out / "data" / "student_seqkd.jsonl", texts)
    n = sum(qa is not None for qa in conversations)
    return {"generate_seconds": round(seconds, 1), "questions": n, "answers_differing_from_dataset": changed}


def run_log(path: Path) -> dict:
    """On-policy facts from a run's metrics.jsonl (logged steps only)."""
    steps = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step_seconds" in s]
    on = [s for s in steps if s.get("on_policy")]
    off = [s for s in steps if not s.get("on_policy")]
    mean = lambda xs: round(statistics.mean(xs), 4) if xs else None  # noqa: E731
    return {"logged_steps": len(steps), "on_policy_logged": len(on),
            "on_policy_step_seconds": mean([s["step_seconds"] for s in on]),
            "off_policy_step_seconds": mean([s["step_seconds"] for s in off]),
            "mean_completion_tokens": mean([s["mean_completion_tokens"] for s in on]),
            "cut_share": mean([s["cut_share"] for s in on])}


def train_arms(out: Path, recipe, seed: int, device: str, arms: list[str], share: float, clock) -> dict[str, dict]:
    """ce, kd (with the teacher, the quickstart's runs) and the chosen extra arms; returns steps and seconds."""
    from lmdistill.api import DistillConfig, TrainConfig
    from lmdistill.quickstart import pipeline
    from lmdistill.tokenizer import load_tokenizer

    info = pipeline.train_models(out, recipe, seed, device, clock)
    for arm, name in (("teacher", "teacher"), ("ce", "student_ce"), ("kd", "student_kd")):
        info[name].update(arm=arm, arm_seconds=info[name]["train_seconds"])
    steps, data, teacher = recipe.student_steps, out / "data", [str(out / "teacher")]
    options = lambda n, path, name: pipeline.common_options(recipe, seed, device, n, path, out / name)  # noqa: E731
    tokenizer = load_tokenizer(out / "tokenizer")
    records, conversations = student_questions(out, tokenizer)
    write_jsonl(data / "student_qa.jsonl", [{"conversations": qa} for qa in conversations if qa])
    clock.say("questions", f"{sum(map(bool, conversations))} of the {len(records)} student records are questions")
    if "seqkd" in arms:
        facts = seqkd_data(out, recipe, seed, device, records, conversations, tokenizer)
        clock.say("seqkd", f"teacher answered {facts['questions']} questions in {facts['generate_seconds']}s; "
                  f"{facts['answers_differing_from_dataset']} differ from the dataset's answers")
        seconds = pipeline.run_training(TrainConfig(**options(steps, data / "student_seqkd.jsonl", folder("seqkd")),
                                                    model=recipe.student, tokenizer=str(out / "tokenizer")))
        info[folder("seqkd")] = {"arm": "seqkd", "train_steps": steps, "train_seconds": round(seconds, 1),
                                 "arm_seconds": round(seconds + facts["generate_seconds"], 1), **facts}
        clock.say("seqkd", f"trained in {seconds:.1f}s")
    phase2 = [a for a in arms if a in PHASE2]
    if phase2:
        s2 = max(1, round(steps * share))
        s1 = steps - s2
        kd = dict(teacher=teacher, student=recipe.student, divergence=recipe.divergence,
                  temperature=recipe.temperature, alpha=recipe.alpha)
        p1 = pipeline.run_training(DistillConfig(**options(s1, data / "student_train.jsonl", "phase1_kd"), **kd))
        clock.say("phase1", f"KD on the 20% for {s1} steps in {p1:.1f}s")
        for arm in phase2:
            config = DistillConfig(**options(s2, data / "student_qa.jsonl", folder(arm)), teacher=teacher,
                                   student=str(out / "phase1_kd"), temperature=recipe.temperature,
                                   alpha=recipe.alpha, max_new_tokens=recipe.max_new_tokens, **PHASE2[arm])
            p2 = pipeline.run_training(config)
            info[folder(arm)] = {"arm": arm, "train_steps": steps, "phase1_steps": s1, "phase2_steps": s2,
                                 "phase1_seconds": round(p1, 1), "phase2_seconds": round(p2, 1),
                                 "train_seconds": round(p1 + p2, 1), "arm_seconds": round(p1 + p2, 1),
                                 "phase2": PHASE2[arm],
                                 **run_log(out / folder(arm))}
            clock.say(arm, f"{s2} steps on the questions in {p2:.1f}s")
    return info


def run_seed(seed: int, recipe, arms: list[str], share: float, work_dir: Path, device: str) -> dict:
    from lmdistill.quickstart import pipeline

    out = work_dir / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    clock = pipeline.Clock()
    load_before = os.getloadavg()[0]
    facts = pipeline.make_data(out, recipe, seed, clock)
    info = train_arms(out, recipe, seed, device, arms, share, clock)
    names = ("teacher", *(folder(a) for a in ARMS if folder(a) in info))
    with mock.patch.object(pipeline, "MODELS", names):  # evaluate_models evaluates the folders named there
        results = pipeline.evaluate_models(out, recipe, device, clock)
    models = {}
    for name in names:
        r = {k: v for k, v in results[name].items() if k != "samples"}
        models[info[name]["arm"]] = {**r, **info[name]}
    return {"seed": seed, "seconds": round(clock(), 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "facts": {k: v for k, v in facts.items() if k != "paths"}, "models": models}


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict]) -> dict:
    names = [m for m in ("teacher", *ARMS) if all(m in r["models"] for r in runs)]
    out = {m: {k: stats([r["models"][m][k] for r in runs]) for k in ("ppl", "ce", "accuracy", "arm_seconds")}
           for m in names}
    for arm in ON_POLICY:  # on-policy minus its off-policy control, per seed
        if arm in names and "kd_qa" in names:
            out[f"{arm}_minus_kd_qa"] = {
                "ppl": stats([r["models"][arm]["ppl"] - r["models"]["kd_qa"]["ppl"] for r in runs]),
                "accuracy": stats([r["models"][arm]["accuracy"] - r["models"]["kd_qa"]["accuracy"] for r in runs])}
    return out


def table(runs: list[dict], summary: dict) -> str:
    names = [m for m in ("teacher", *ARMS) if m in summary]
    lines = [f"{'arm':<8} {'held-out ppl':>16} {'exact match':>16} {'seconds':>8}   "
             "per seed: ppl, exact match [95% CI]"]
    for m in names:
        s = summary[m]
        seeds = "; ".join(f"{r['seed']}: {r['models'][m]['ppl']:.2f}, {r['models'][m]['accuracy']:.1%} "
                          f"[{r['models'][m]['ci95'][0]:.0%}-{r['models'][m]['ci95'][1]:.0%}]" for r in runs)
        lines.append(f"{m:<8} {s['ppl']['mean']:>8.2f} +- {s['ppl']['std']:<4.2f} {s['accuracy']['mean']:>8.1%} +- "
                     f"{s['accuracy']['std']:<5.1%} {s['arm_seconds']['mean']:>7.0f}   {seeds}")
    for arm in ON_POLICY:
        d = summary.get(f"{arm}_minus_kd_qa")
        if d:
            lines.append(f"{arm} - kd_qa: ppl {d['ppl']['mean']:+.2f} (range {d['ppl']['min']:+.2f}.."
                         f"{d['ppl']['max']:+.2f}), "
                         f"exact match {d['accuracy']['mean']:+.1%} (range {d['accuracy']['min']:+.1%}.."
                         f"{d['accuracy']['max']:+.1%})")
    for arm in PHASE2:  # phase 2 only: the same question data, off- and on-policy steps
        logs = [r["models"][arm] for r in runs if arm in r["models"]]
        if logs:
            on = [x["on_policy_step_seconds"] for x in logs if x["on_policy_step_seconds"] is not None]
            off = [x["off_policy_step_seconds"] for x in logs if x["off_policy_step_seconds"] is not None]
            lines.append(f"{arm} phase 2: {statistics.mean(x['phase2_seconds'] for x in logs):.1f}s"
                         + (f", off-policy steps {statistics.mean(off):.3f}s" if off else "")
                         + (f", on-policy steps {statistics.mean(on):.3f}s, mean completion "
                            f"{statistics.mean(x['mean_completion_tokens'] for x in logs):.1f} tokens, cut share "
                            f"{statistics.mean(x['cut_share'] for x in logs):.2f}" if on else ""))
    return "\n".join(lines)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps_scale", type=float, default=1.0, help="every step count times this (Recipe.scaled)")
    parser.add_argument("--arms", nargs="+", default=list(EXTRA_ARMS), choices=EXTRA_ARMS,
                        help="arms beyond ce and kd (which always run, with the teacher)")
    parser.add_argument("--phase2_share", type=float, default=0.25,
                        help="share of the steps the kd_qa/gkd/rkl/minillm arms spend on the questions")
    parser.add_argument("--work_dir", default="/tmp/lmdistill_on_policy_seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "on_policy_seeds.json"))
    args = parser.parse_args()

    import torch

    from lmdistill.quickstart.pipeline import Recipe

    recipe = Recipe().scaled(args.steps_scale)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python benchmarks/on_policy_seeds.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--steps_scale {args.steps_scale:g}",
         f"--arms {' '.join(args.arms)}", f"--phase2_share {args.phase2_share:g}", f"--device {args.device}"])
    record = {"command": command, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                              "python": platform.python_version(), "torch": torch.__version__},
              "recipe": dataclasses.asdict(recipe), "runs": []}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for seed in args.seeds:
        record["runs"].append(run_seed(seed, recipe, args.arms, args.phase2_share, Path(args.work_dir), args.device))
        record["summary"] = summarize(record["runs"])
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        output.write_text(json.dumps(record, indent=2) + "\n")  # after every seed: a cut run keeps its seeds
        print(f"seed {seed} done in {record['runs'][-1]['seconds']:.0f}s (load {record['runs'][-1]['load_before']:.1f}"
              f" -> {record['runs'][-1]['load_after']:.1f})", flush=True)
    print(table(record["runs"], record["summary"]))
    print(f"wrote {output} ({record['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
