"""`lmdistill eval`: several models on the same examples, one markdown table.

    lmdistill eval --model out/ce --model out/kd --teacher teacher/ --data test.jsonl --output_dir out/eval
    lmdistill eval --model out/kd --data gsm8k_test.jsonl --task exact_match --answer_regex '####\\s*(\\S+)'
    lmdistill eval --model out/kd --data test.jsonl --task rouge --max_new_tokens 128

Tasks: `lm` (CE, perplexity, bits/byte on the trained tokens; with `--teacher`, KL(teacher || model), top-1
agreement and the teacher's own CE, with a note when the teacher is worse than a model on this data), `exact_match`
and `rouge` (greedy replies to each conversation's prompt, see `eval/tasks.py`).
Each model uses its own folder's tokenizer (or `--tokenizer`); perplexities of models with different
tokenizers are not comparable, bits/byte are, and KL/agreement need the teacher's vocabulary. Writes
`eval.json` ({model: metrics}) and `eval.md` to `--output_dir` when given; the table is always printed.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from lmdistill.errors import LmdistillError
from lmdistill.eval.scoring import compile_answer_regex
from lmdistill.tokenizer import has_tokenizer, load_tokenizer

LM_COLUMNS = ("model", "tokens", "CE", "PPL", "bits/byte", "KL to teacher", "agreement")
TASK_COLUMNS = ("model", "n", "accuracy", "95% CI", "Rouge-L", "Rouge-L 95% CI", "unfinished")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmdistill.config import int_at_least
    from lmdistill.data.options import add_data_arguments

    a = parser.add_argument
    a("--model", action="append", default=None, metavar="DIR",
      help="model folder (HF), or a preset name (random weights, for quick tests); repeat to compare models")
    add_data_arguments(parser, "held-out data: any format `lmdistill data` reads (tasks need conversations ending "
                               "with the reference)", skip_bad_records=False)
    a("--teacher", default=None, help="teacher folder: adds KL(teacher || model) and top-1 agreement (task lm)")
    a("--task", choices=("lm", "exact_match", "rouge"), default="lm", help="what to measure")
    a("--tokenizer", default=None, help="tokenizer folder for every model (default: each model folder's own)")
    a("--output_dir", "--out_dir", dest="output_dir", default=None,
      help="write eval.json and eval.md here (default: only print the table)")
    a("--batch_size", type=int_at_least(1), default=16, help="sequences per forward pass / prompts per generate call")
    a("--max_seq_len", type=int_at_least(2), default=512,
      help="lm: examples are truncated to this many tokens; tasks: longer prompts keep their last tokens")
    a("--max_new_tokens", type=int_at_least(1), default=64, help="tasks: the longest reply generated")
    a("--answer_regex", default=None,
      help="tasks: compare only the last match of this regex (its first group), e.g. '####\\s*(\\S+)' for GSM8K")
    a("--max_examples", type=int_at_least(1), default=None, help="evaluate only the first N examples (records for tasks)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
      help="weights dtype (default: the checkpoint's, float32 for presets)")


def run(args: argparse.Namespace) -> int:
    import torch

    models, tokenizer_paths = _check_args(args)
    torch.manual_seed(0)  # presets get the same random weights on every run
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizers = {path: load_tokenizer(path) for path in dict.fromkeys(tokenizer_paths)}
    if args.task == "lm":
        results, notes = _run_lm(args, models, tokenizer_paths, tokenizers, device)
    else:
        results, notes = _run_task(args, models, tokenizer_paths, tokenizers, device)
    first = tokenizers[tokenizer_paths[0]].get_vocab()
    if args.task == "lm" and any(tokenizers[p].get_vocab() != first for p in tokenizer_paths[1:]):
        notes.append("The models use different tokenizers: compare them by bits/byte (CE and perplexity are per "
                     "token of each model's own tokenizer).")
    table = markdown_table(results, args.task)
    print(f"\n{table}")
    for note in notes:
        print(f"\nNote: {note}")
    if args.output_dir:
        _write(Path(args.output_dir), results, table, notes, args)
    return 0


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The model list and each model's tokenizer folder; LmdistillError for anything a user must fix."""
    models = [args.model] if isinstance(args.model, str) else list(args.model or [])
    if not models:
        raise LmdistillError("--model is required: a model folder (or a preset name); repeat it to compare models.")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise LmdistillError(f"--model {repeated[0]} is given more than once; each model is evaluated once.")
    if args.teacher and args.task != "lm":
        raise LmdistillError(f"--teacher applies to --task lm only (KL and agreement); to score the teacher on "
                             f"{args.task}, pass it as another --model.")
    if args.answer_regex is not None and args.task == "lm":
        raise LmdistillError("--answer_regex applies to --task exact_match and rouge, not lm.")
    compile_answer_regex(args.answer_regex)
    from lmdistill.data import check_data_path
    from lmdistill.models.loading import check_device, check_model_ref

    check_device(args.device)
    check_data_path(args.data, "--data")
    for model in models:
        check_model_ref("--model", model)
    if args.teacher:
        check_model_ref("--teacher", args.teacher)
    return models, _tokenizer_paths(args, models)


def _tokenizer_paths(args: argparse.Namespace, models: list[str]) -> list[str]:
    """--tokenizer for every model, else each model folder's own, else the first one found (models, teacher)."""
    if args.tokenizer:
        return [args.tokenizer] * len(models)
    own = [m if has_tokenizer(m) else None for m in models]
    fallback = next((p for p in own if p), args.teacher if has_tokenizer(args.teacher) else None)
    if fallback is None:
        raise LmdistillError(f"no tokenizer: --model {models[0]} has no tokenizer files (tokenizer.json) and no "
                             "other model or --teacher does; pass --tokenizer DIR.")
    return [p or fallback for p in own]


def _run_lm(args, models, tokenizer_paths, tokenizers, device) -> tuple[dict, list[str]]:
    from lmdistill.data import load_examples
    from lmdistill.train.evaluate import evaluate_lm
    from lmdistill.models import load_model, load_teacher

    teacher = teacher_vocab = None
    if args.teacher:
        teacher_tok = load_tokenizer(args.teacher) if has_tokenizer(args.teacher) else tokenizers[tokenizer_paths[0]]
        teacher = load_teacher(args.teacher, dtype=args.dtype, device=device, tokenizer=teacher_tok)
        teacher_vocab = teacher_tok.get_vocab()
    examples, results, notes = {}, {}, []
    for name, tok_path in zip(models, tokenizer_paths):
        tokenizer = tokenizers[tok_path]
        if tok_path not in examples:
            loaded = load_examples(args.data, tokenizer, args.max_seq_len, args.data_format, num_proc=args.num_proc,
                                   cache_dir=args.data_cache)
            examples[tok_path] = loaded[: args.max_examples] if args.max_examples else loaded
            print(f"{loaded.stats.summary()} Evaluating on {len(examples[tok_path]):,} examples.")
        model = load_model(name, tokenizer=tokenizer, dtype=args.dtype, device=device)
        with_teacher = teacher is not None and tokenizer.get_vocab() == teacher_vocab
        if teacher is not None and not with_teacher:
            notes.append(f"{name}: no KL/agreement, its tokenizer's vocabulary differs from the teacher's.")
        vocab = None
        if with_teacher and _output_rows(model) != _output_rows(teacher):  # padded embedding tables
            vocab = len(tokenizer)
        results[name] = evaluate_lm(model, examples[tok_path], tokenizer, teacher if with_teacher else None,
                                    batch_size=args.batch_size, device=device, vocab_size=vocab)
        results[name].update(task="lm", examples=len(examples[tok_path]), tokenizer=tok_path)
        teacher_ce, ce = results[name].get("teacher_ce"), results[name]["ce"]
        if teacher_ce is not None and teacher_ce > ce * (1 + 1e-6):
            results[name]["teacher_worse"] = True
            notes.append(f"the teacher {args.teacher} is worse than {name} on this data (teacher CE {teacher_ce:.4f} > "
                         f"{ce:.4f}): distilling it into {name} will not help.")
        del model
        gc.collect()
    return results, notes


def _output_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _run_task(args, models, tokenizer_paths, tokenizers, device) -> tuple[dict, list[str]]:
    from lmdistill.eval.tasks import evaluate_task, load_task_records
    from lmdistill.models import load_model

    regex = compile_answer_regex(args.answer_regex)
    records = load_task_records(args.data, args.data_format)
    total = len(records)
    records = records[: args.max_examples] if args.max_examples else records
    print(f"{args.data}: {total:,} records, evaluating {args.task} on {len(records):,}.")
    results, notes = {}, []
    for name, tok_path in zip(models, tokenizer_paths):
        model = load_model(name, tokenizer=tokenizers[tok_path], dtype=args.dtype, device=device)
        result = evaluate_task(model, tokenizers[tok_path], records, args.task, args.max_new_tokens, args.batch_size,
                               regex, device, max_prompt_tokens=args.max_seq_len, description=name)
        results[name] = {**result, "tokenizer": tok_path}
        if result["truncated_prompts"]:
            notes.append(f"{name}: {result['truncated_prompts']:,} prompts longer than --max_seq_len "
                         f"{args.max_seq_len} kept only their last tokens.")
        if result["unfinished"]:
            notes.append(f"{name}: {result['unfinished']:,} of {result['n']:,} replies reached --max_new_tokens "
                         f"{args.max_new_tokens} before ending.")
        del model
        gc.collect()
    return results, notes


def markdown_table(results: dict[str, dict], task: str) -> str:
    """One row per model: lm metrics, or task accuracy with its 95% interval (and Rouge-L)."""
    columns = LM_COLUMNS if task == "lm" else TASK_COLUMNS if task == "rouge" else TASK_COLUMNS[:4] + TASK_COLUMNS[6:]
    rows = [_lm_row(m) if task == "lm" else _task_row(m, task == "rouge") for m in results.values()]
    rule = "|" + "|".join("---" if c == "model" else "---:" for c in columns) + "|"
    lines = ["| " + " | ".join(columns) + " |", rule]
    for name, row in zip(results, rows):
        lines.append("| " + " | ".join([name.replace("|", "\\|"), *row]) + " |")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _lm_row(m: dict) -> list[str]:
    return [f"{m['tokens']:,}", _fmt(m["ce"], ".4f"), _fmt(m["ppl"], ",.2f"), _fmt(m["bits_per_byte"], ".4f"),
            _fmt(m.get("kl_to_teacher"), ".4f"), _fmt(m.get("agreement"), ".2%")]


def _task_row(m: dict, rouge: bool) -> list[str]:
    row = [f"{m['n']:,}", f"{m['accuracy']:.2%}", f"{m['ci95_low']:.1%} – {m['ci95_high']:.1%}"]
    if rouge:
        row += [f"{m['rouge_l']:.4f}", f"{m['rouge_l_ci95_low']:.4f} – {m['rouge_l_ci95_high']:.4f}"]
    return row + [f"{m['unfinished']:,}"]


def _write(output_dir: Path, results: dict, table: str, notes: list[str], args: argparse.Namespace) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "eval.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    text = f"# lmdistill eval: {args.task} on {args.data}\n\n{table}\n" + "".join(f"\n{note}\n" for note in notes)
    (output_dir / "eval.md").write_text(text, encoding="utf-8")
    print(f"\nWrote {output_dir / 'eval.json'} and {output_dir / 'eval.md'}.")
