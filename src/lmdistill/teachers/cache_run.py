"""`lmdistill cache-teacher` run from its typed options (`CacheTeacherConfig`): the checks that need no model, then
the teacher over the data into a cache folder (`lmdistill.teachers.cache.build_cache`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmdistill.errors import LmdistillError


def _preflight(config):
    """Every check that needs no model, before the teacher loads: returns the tokenizer."""
    from lmdistill.data import check_data_path
    from lmdistill.models.loading import check_device, check_model_ref
    from lmdistill.tokenizer import has_tokenizer, load_tokenizer, vocabulary_difference

    check_device(config.device)
    check_data_path(config.data, "--data")
    if config.eval_data:
        check_data_path(config.eval_data, "--eval_data")
    check_model_ref("--teacher", config.teacher)
    out = Path(config.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmdistillError(f"--output_dir: expected a new or empty folder for the cache, found '{out}' with files "
                             "in it; choose another folder or delete it.")
    if not has_tokenizer(config.teacher) and not config.tokenizer:
        raise LmdistillError(f"no tokenizer: --teacher '{config.teacher}' has no tokenizer files; pass --tokenizer DIR.")
    tokenizer = load_tokenizer(config.tokenizer or config.teacher, "--tokenizer" if config.tokenizer else "--teacher")
    if config.tokenizer and has_tokenizer(config.teacher):
        diff = vocabulary_difference(tokenizer, load_tokenizer(config.teacher, "--teacher"))
        if diff is not None:
            raise LmdistillError(f"the tokenizers of --tokenizer {config.tokenizer} and --teacher {config.teacher} "
                                 f"disagree ({diff}): cache with the teacher's own tokenizer.")
    if config.top_k > len(tokenizer):
        raise LmdistillError(f"--top_k: expected at most the vocabulary size ({len(tokenizer):,} tokens), found "
                             f"{config.top_k}.")
    return tokenizer


def cache_teacher(config) -> Path:
    import torch

    from lmdistill.data import load_examples
    from lmdistill.models import load_teacher
    from lmdistill.teachers.cache import build_cache

    tokenizer = _preflight(config)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    store = dict(num_proc=config.num_proc, cache_dir=config.data_cache)
    examples = load_examples(config.data, tokenizer, config.max_seq_len, config.data_format, config.skip_bad_records,
                             **store)
    print(f"data: {examples.stats.summary()}")
    eval_examples = None
    if config.eval_data:
        eval_examples = load_examples(config.eval_data, tokenizer, config.max_seq_len, config.data_format,
                                      config.skip_bad_records, **store)
        print(f"eval data: {eval_examples.stats.summary()}")
    teacher = load_teacher(config.teacher, adapter=config.teacher_adapter, dtype=config.teacher_dtype, device=device,
                           tokenizer=tokenizer)
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise LmdistillError(f"--teacher: the tokenizer has {len(tokenizer)} tokens but the teacher only {rows} "
                             "output rows; the model does not belong to this tokenizer.")
    meta = {"teacher": str(config.teacher), "teacher_adapter": config.teacher_adapter, "teacher_dtype": config.teacher_dtype,
            "data": str(config.data), "data_format": config.data_format, "max_seq_len": config.max_seq_len,
            "skip_bad_records": config.skip_bad_records, "eval_data": config.eval_data}
    t0 = time.perf_counter()
    out = build_cache(teacher, tokenizer, examples, config.output_dir, config.top_k, meta=meta, batch_size=config.batch_size,
                      device=device, vocab_size=len(tokenizer), eval_examples=eval_examples)
    info = json.loads((out / "cache.json").read_text())
    mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    print(f"cached the teacher's top-{config.top_k} at {info['positions']} trained positions of {info['examples']} "
          f"examples in {time.perf_counter() - t0:.1f} s: {out} ({mb:.1f} MiB)")
    evals = f" --eval_data {config.eval_data}" if config.eval_data else ""
    print(f"next: lmdistill distill --teacher_cache {out} --student ... --data {config.data}{evals} "
          f"--max_seq_len {config.max_seq_len} --output_dir ...")
    return out
