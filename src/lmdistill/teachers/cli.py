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
    a = parser.add_argument
    a("--teacher", required=False, help="teacher: a local HF model folder")
    a("--teacher_adapter", default=None, help="LoRA adapter folder merged into the teacher")
    a("--tokenizer", default=None, help="tokenizer folder (default: the teacher's)")
    a("--data", "--data_path", dest="data", required=False, help="the data file the students will be trained on")
    a("--data_format", default="auto", help="force a data format instead of detecting it")
    a("--skip_bad_records", action="store_true", help="skip malformed records (counted and reported)")
    a("--max_seq_len", type=int, default=512, help="as the distill runs that will read the cache")
    a("--output_dir", "--out_dir", dest="output_dir", default=None, help="the cache folder to create")
    a("--top_k", type=int, default=64, help="teacher tokens kept per position")
    a("--batch_size", type=int, default=8)
    a("--teacher_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lmdistill.data import load_examples
    from lmdistill.models import load_teacher
    from lmdistill.teachers.cache import build_cache
    from lmdistill.train.setup import _has_tokenizer, load_tokenizer, require

    require(args, "teacher", "data", "output_dir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok_path = args.tokenizer or (args.teacher if _has_tokenizer(args.teacher) else None)
    tokenizer = load_tokenizer(tok_path, "--tokenizer")
    examples = load_examples(args.data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)
    print(f"data: {examples.stats.summary()}")
    teacher = load_teacher(args.teacher, adapter=args.teacher_adapter, dtype=args.teacher_dtype, device=device,
                           tokenizer=tokenizer)
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise LmdistillError(f"--teacher: the tokenizer has {len(tokenizer)} tokens but the teacher only {rows} "
                             "output rows; the model does not belong to this tokenizer.")
    meta = {"teacher": str(args.teacher), "teacher_adapter": args.teacher_adapter, "teacher_dtype": args.teacher_dtype,
            "data": str(args.data), "data_format": args.data_format, "max_seq_len": args.max_seq_len,
            "skip_bad_records": args.skip_bad_records}
    t0 = time.perf_counter()
    out = build_cache(teacher, tokenizer, examples, args.output_dir, args.top_k, meta=meta, batch_size=args.batch_size,
                      device=device, vocab_size=len(tokenizer))
    info = json.loads((out / "cache.json").read_text())
    mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    print(f"cached the teacher's top-{args.top_k} at {info['positions']} trained positions of {info['examples']} "
          f"examples in {time.perf_counter() - t0:.1f} s: {out} ({mb:.1f} MiB)")
    print(f"next: lmdistill distill --teacher_cache {out} --student ... --data {args.data} "
          f"--max_seq_len {args.max_seq_len} --output_dir ...")
    return 0
