"""`lmdistill cache-teacher`: run a teacher once over a data file and keep its top-k distribution on disk.

    lmdistill cache-teacher --teacher runs/teacher --data train.jsonl --output_dir cache/ --top_k 64
    lmdistill distill --teacher_cache cache/ --student nano --data train.jsonl --output_dir runs/kd
"""

from __future__ import annotations

import argparse
import json
import time

from lmdistill.errors import LmdistillError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmdistill.config import int_at_least
    from lmdistill.data.options import add_data_arguments

    a = parser.add_argument
    a("--teacher", required=True, help="teacher: a local HF model folder")
    a("--teacher_adapter", default=None, help="LoRA adapter folder merged into the teacher at load")
    a("--tokenizer", default=None, help="tokenizer folder (default: the teacher's); must have the teacher's vocabulary")
    add_data_arguments(parser, "the data file the students will be trained on")
    a("--eval_data", default=None,
      help="held-out data the students will be evaluated on: cached too (in eval/), so distill runs from the cache "
           "report KL and agreement to the teacher")
    a("--max_seq_len", type=int_at_least(2), default=512, help="as the distill runs that will read the cache")
    a("--output_dir", "--out_dir", dest="output_dir", required=True, help="the cache folder to create (new or empty)")
    a("--top_k", type=int_at_least(1), default=64, help="teacher tokens kept per position")
    a("--batch_size", type=int_at_least(1), default=8, help="examples per teacher forward pass")
    a("--teacher_dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="teacher weights dtype")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def _preflight(args: argparse.Namespace):
    """Every check that needs no model, before the teacher loads: returns the tokenizer."""
    from pathlib import Path

    from lmdistill.data import check_data_path
    from lmdistill.models.loading import check_device, check_model_ref
    from lmdistill.tokenizer import has_tokenizer, load_tokenizer, vocabulary_difference

    check_device(args.device)
    check_data_path(args.data, "--data")
    if args.eval_data:
        check_data_path(args.eval_data, "--eval_data")
    check_model_ref("--teacher", args.teacher)
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmdistillError(f"--output_dir: expected a new or empty folder for the cache, found '{out}' with files "
                             "in it; choose another folder or delete it.")
    if not has_tokenizer(args.teacher) and not args.tokenizer:
        raise LmdistillError(f"no tokenizer: --teacher '{args.teacher}' has no tokenizer files; pass --tokenizer DIR.")
    tokenizer = load_tokenizer(args.tokenizer or args.teacher, "--tokenizer" if args.tokenizer else "--teacher")
    if args.tokenizer and has_tokenizer(args.teacher):
        diff = vocabulary_difference(tokenizer, load_tokenizer(args.teacher, "--teacher"))
        if diff is not None:
            raise LmdistillError(f"the tokenizers of --tokenizer {args.tokenizer} and --teacher {args.teacher} "
                                 f"disagree ({diff}): cache with the teacher's own tokenizer.")
    if args.top_k > len(tokenizer):
        raise LmdistillError(f"--top_k: expected at most the vocabulary size ({len(tokenizer):,} tokens), found "
                             f"{args.top_k}.")
    return tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from lmdistill.data import load_examples
    from lmdistill.models import load_teacher
    from lmdistill.teachers.cache import build_cache

    tokenizer = _preflight(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    examples = load_examples(args.data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)
    print(f"data: {examples.stats.summary()}")
    eval_examples = None
    if args.eval_data:
        eval_examples = load_examples(args.eval_data, tokenizer, args.max_seq_len, args.data_format,
                                      args.skip_bad_records)
        print(f"eval data: {eval_examples.stats.summary()}")
    teacher = load_teacher(args.teacher, adapter=args.teacher_adapter, dtype=args.teacher_dtype, device=device,
                           tokenizer=tokenizer)
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise LmdistillError(f"--teacher: the tokenizer has {len(tokenizer)} tokens but the teacher only {rows} "
                             "output rows; the model does not belong to this tokenizer.")
    meta = {"teacher": str(args.teacher), "teacher_adapter": args.teacher_adapter, "teacher_dtype": args.teacher_dtype,
            "data": str(args.data), "data_format": args.data_format, "max_seq_len": args.max_seq_len,
            "skip_bad_records": args.skip_bad_records, "eval_data": args.eval_data}
    t0 = time.perf_counter()
    out = build_cache(teacher, tokenizer, examples, args.output_dir, args.top_k, meta=meta, batch_size=args.batch_size,
                      device=device, vocab_size=len(tokenizer), eval_examples=eval_examples)
    info = json.loads((out / "cache.json").read_text())
    mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    print(f"cached the teacher's top-{args.top_k} at {info['positions']} trained positions of {info['examples']} "
          f"examples in {time.perf_counter() - t0:.1f} s: {out} ({mb:.1f} MiB)")
    evals = f" --eval_data {args.eval_data}" if args.eval_data else ""
    print(f"next: lmdistill distill --teacher_cache {out} --student ... --data {args.data}{evals} "
          f"--max_seq_len {args.max_seq_len} --output_dir ...")
    return 0
