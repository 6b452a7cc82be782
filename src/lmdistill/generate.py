"""`lmdistill generate`: a model (usually the teacher) writes replies to prompts -- training data for
sequence-level distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): a student trained with
plain CE on the teacher's own outputs.

    lmdistill generate --model runs/teacher --prompts prompts.jsonl --output_file teacher_data.jsonl \\
        --num_samples 2 --max_new_tokens 256 --temperature 0.7 --top_p 0.95
    lmdistill train --model nano --tokenizer runs/teacher --data teacher_data.jsonl --output_dir runs/seqkd

Prompts come from any data format with conversations or prompts (a trailing assistant reply, if any, is dropped
and replaced). The output is MiniMind conversations JSONL (the prompt turns plus the generated reply), which
`train` and `distill` read as they are. The run is resumable: prompts that already have their samples in
--output_file are skipped, each batch's lines are written and flushed together, and a line cut by a kill is
removed on the next start (and said so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from lmdistill.errors import DiskWriteError, LmdistillError, free_bytes, size_text, write_failure

Messages = list[dict[str, Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmdistill.config import float_in, int_at_least
    from lmdistill.data.options import DATA_FORMATS
    from lmdistill.models.generation import BACKENDS

    a = parser.add_argument
    a("--model", required=True, help="the model that writes the replies: a local HF folder (or a preset, for tests)")
    a("--prompts", "--data", dest="prompts", required=True,
      help="prompts: any data file with conversations or prompts (a final assistant reply is replaced)")
    a("--output_file", required=True, help="MiniMind conversations JSONL to write (appended to when resuming)")
    a("--tokenizer", default=None, help="tokenizer folder (default: the model folder's own)")
    a("--data_format", default="auto", choices=DATA_FORMATS, help="record shape of --prompts (auto: detected)")
    a("--num_samples", type=int_at_least(1), default=1, help="replies per prompt")
    a("--max_new_tokens", type=int_at_least(1), default=256, help="the longest reply")
    a("--temperature", type=float_in(0), default=1.0, help="sampling temperature (0: greedy)")
    a("--top_p", type=float_in(0, 1, lo_open=True), default=1.0, help="nucleus sampling: keep this much mass")
    a("--top_k", type=int_at_least(0), default=0, help="sample among the k most likely tokens (0: all)")
    a("--max_prompt_tokens", type=int_at_least(1), default=2048, help="longer prompts keep their last tokens")
    a("--batch_size", type=int_at_least(1), default=16, help="prompts per generate call")
    a("--seed", type=int, default=0, help="seeds the sampling")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
      help="weights dtype (default: the checkpoint's, float32 for presets)")
    a("--generation_backend", default="auto", choices=BACKENDS,
      help="auto (the lean decode loop on CPU, transformers' generate on GPU), lean, hf, or vllm (CUDA only)")
    a("--vllm_gpu_memory_utilization", type=float_in(0, 1, lo_open=True), default=0.9,
      help="--generation_backend vllm: share of the GPU's memory vLLM may take")


def prompt_key(messages: Messages) -> str:
    """A stable key of a prompt's turns (what resume matches on)."""
    text = json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def _existing(path: Path) -> dict[str, int]:
    """Samples already written per prompt key; a last line cut by a kill is removed first."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        print(f"{path}: removed an incomplete last line (a run was stopped while writing it)")
        data = data[:cut]
    counts: dict[str, int] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            messages = json.loads(line)["conversations"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LmdistillError(f"{path}:{number}: expected a line written by `lmdistill generate` (a MiniMind "
                                 "conversation); choose a new --output_file.") from None
        key = prompt_key(messages[:-1])
        counts[key] = counts.get(key, 0) + 1
    return counts


def run(args: argparse.Namespace) -> int:
    import torch

    from lmdistill.data import check_data_path, load_prompts, render_prompt
    from lmdistill.models import load_model
    from lmdistill.models.generation import generate_replies, stop_token_ids
    from lmdistill.models.loading import check_device, check_model_ref
    from lmdistill.tokenizer import has_tokenizer, load_tokenizer

    check_device(args.device)
    check_data_path(args.prompts, "--prompts")
    check_model_ref("--model", args.model)
    if args.generation_backend == "vllm":
        from lmdistill.models.vllm_backend import check_vllm

        check_vllm(args.device)
        if not Path(args.model).is_dir():
            raise LmdistillError(f"--generation_backend vllm: --model must be an HF model folder, found '{args.model}' "
                                 "(a preset has no weights on disk for vLLM to load).")
    out = Path(args.output_file)
    if out.is_dir():
        raise LmdistillError(f"--output_file: expected a file, found a folder at '{out}'.")
    if not args.tokenizer and not has_tokenizer(args.model):
        raise LmdistillError(f"no tokenizer: --model '{args.model}' has no tokenizer files; pass --tokenizer DIR.")
    tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    prompts = load_prompts(args.prompts, args.data_format)
    done = _existing(out)
    todo = [(p, prompt_key(p)) for p in prompts]
    todo = [(p, k) for p, k in todo for _ in range(max(0, args.num_samples - done.get(k, 0)))]
    skipped = len(prompts) * args.num_samples - len(todo)
    print(f"{args.prompts}: {len(prompts):,} prompts x {args.num_samples} samples; {skipped:,} already in {out}, "
          f"{len(todo):,} to generate.")
    if not todo:
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    ids = [render_prompt(tokenizer, p)[-args.max_prompt_tokens:] for p, _ in todo]
    if args.generation_backend == "vllm":
        from lmdistill.models.vllm_backend import VllmGenerator, reply_seeds

        engine = VllmGenerator(args.model, tokenizer, dtype=args.dtype or "auto",
                               gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed)
        stops = stop_token_ids(tokenizer)
        seeds = reply_seeds(args.seed, len(done), 0, len(ids))

        def model_generate(on_batch):
            for start in range(0, len(ids), args.batch_size):
                batch = list(range(start, min(start + args.batch_size, len(ids))))
                on_batch(batch, engine.replies([ids[i] for i in batch], args.max_new_tokens, args.temperature,
                                               args.top_p, args.top_k, stops, [seeds[i] for i in batch]))
    else:
        model = load_model(args.model, tokenizer=tokenizer, dtype=args.dtype, device=device)

        def model_generate(on_batch):
            generate_replies(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             device=device, temperature=args.temperature, top_p=args.top_p, sample_top_k=args.top_k,
                             on_batch=on_batch, description="generate", backend=args.generation_backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, new_tokens, cut = time.perf_counter(), 0, 0
    with open(out, "ab", buffering=0) as f:  # unbuffered: a failed write leaves nothing queued to write again
        def write(batch_indices, replies):  # one batch's lines at once, synced to disk
            nonlocal new_tokens, cut
            lines = []
            for i, reply in zip(batch_indices, replies):
                lines.append(json.dumps({"conversations": [*todo[i][0], {"role": "assistant", "content": reply.text}]},
                                        ensure_ascii=False) + "\n")
                new_tokens += len(reply.token_ids)
                cut += not reply.finished
            before = os.path.getsize(out)
            try:
                data = memoryview("".join(lines).encode("utf-8"))
                while data:  # a raw write may take part of it
                    data = data[f.write(data):]
                os.fsync(f.fileno())
            except OSError as exc:  # a full or failing disk: keep every complete earlier line, drop this batch's
                os.truncate(out, before)
                raise DiskWriteError(f"writing replies to '{out}' failed: {write_failure(exc)}; "
                                     f"{size_text(free_bytes(out.parent))} free there. The replies written before are "
                                     "kept and this batch's were removed; free space, then run the same command again "
                                     "to continue where it stopped.") from None

        model_generate(write)
    seconds = time.perf_counter() - t0
    print(f"wrote {len(todo):,} replies ({new_tokens:,} tokens, {new_tokens / max(seconds, 1e-9):,.0f} tokens/s) to "
          f"{out}; {cut:,} were cut at --max_new_tokens {args.max_new_tokens}.")
    return 0
