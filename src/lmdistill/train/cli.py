"""`lmdistill train` (cross-entropy) and `lmdistill distill` (teacher -> student): options and entry point.

    lmdistill train --model micro --tokenizer tok/ --data corpus.txt --output_dir runs/teacher --max_steps 200
    lmdistill distill --teacher runs/teacher --student nano --data train.jsonl --output_dir runs/kd --alpha 0.0

Both commands accept a recipe (`--config recipe.yaml`, flags override it) and MiniMind's flag names
(`--out_dir --epochs --batch_size --learning_rate --device --dtype --use_wandb --wandb_project --num_workers
--ddp --accumulation_steps --grad_clip --warmup_iters --log_interval --save_interval --data_path
--max_seq_len --alpha --temperature`) with MiniMind's meaning.
"""

from __future__ import annotations

import argparse

from lmdistill.losses.divergences import ALIASES, DIVERGENCES


def _common(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--data", "--data_path", dest="data", required=False, help="training data file (any supported format)")
    a("--data_format", default="auto", help="force a data format instead of detecting it")
    a("--skip_bad_records", action="store_true", help="skip malformed records (counted and reported)")
    a("--output_dir", "--out_dir", dest="output_dir", default=None, help="run directory (model, checkpoints, metrics)")
    a("--tokenizer", default=None, help="tokenizer folder (distill: defaults to the teacher's)")
    a("--max_steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    a("--epochs", type=float, default=1.0, help="passes over the data when --max_steps is not given")
    a("--batch_size", type=int, default=8, help="examples per micro-batch per process")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning_rate", "--lr", dest="learning_rate", type=float, default=5e-4)
    a("--weight_decay", type=float, default=0.01)
    a("--warmup_iters", type=int, default=0, help="linear warmup steps, then cosine from lr down to lr/10")
    a("--grad_clip", type=float, default=1.0, help="max gradient norm (0 disables clipping)")
    a("--max_seq_len", type=int, default=512)
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
      help="training precision: float32, or bf16/fp16 mixed precision (autocast, fp32 master weights)")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available; under torchrun the local GPU)")
    a("--seed", type=int, default=42)
    a("--log_interval", type=int, default=10)
    a("--save_interval", type=int, default=0, help="write checkpoint-STEP/ every N steps (0: only at the end)")
    a("--keep_checkpoints", type=int, default=2, help="keep the last K checkpoints")
    a("--eval_data", default=None, help="held-out data for evaluation during training")
    a("--eval_interval", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--eval_batches", type=int, default=50, help="at most this many eval batches each time")
    a("--resume", nargs="?", const="latest", default=None,
      help="continue from the latest complete checkpoint in --output_dir, or from the given checkpoint folder")
    a("--report_to", default="none", choices=["none", "wandb", "tensorboard", "swanlab"])
    a("--use_wandb", action="store_true", help="MiniMind: same as --report_to wandb")
    a("--wandb_project", default="lmdistill", help="project name for wandb / swanlab")
    a("--num_workers", type=int, default=0, help="accepted for MiniMind compatibility (tokenized data is in memory)")
    a("--ddp", action="store_true", help="accepted for MiniMind compatibility (torchrun/accelerate decide)")
    a("--gradient_checkpointing", action="store_true", help="recompute student activations in backward")
    a("--lora_r", type=int, default=0, help="train a LoRA adapter of this rank on the student (0: full training)")
    a("--lora_alpha", type=float, default=16.0)
    a("--lora_dropout", type=float, default=0.05)
    a("--lora_target_modules", default=None, help="comma-separated module names (default: Qwen/Llama projections)")
    a("--hidden_size", "--dim", dest="hidden_size", type=int, default=None, help="override a preset's width")
    a("--num_layers", "--n_layers", dest="num_layers", type=int, default=None, help="override a preset's depth")
    a("--use_moe", action="store_true", default=None, help="use a preset's MoE variant")


def _distill(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--teacher", required=False, help="teacher: a local HF model folder (or a preset, for tests)")
    a("--student", required=False, help="student: a preset name or a local HF model folder")
    a("--teacher_cache", default=None,
      help="a folder made by `lmdistill cache-teacher`: the teacher's top-k at every trained position, read "
           "instead of running a teacher")
    a("--teacher_adapter", default=None, help="LoRA adapter folder merged into the teacher")
    a("--teacher_dtype", default=None, choices=["float32", "bfloat16", "float16"],
      help="teacher weights dtype (default: bfloat16 under --dtype bfloat16, else float32)")
    a("--divergence", default="forward_kl", choices=sorted(list(DIVERGENCES) + list(ALIASES)))
    a("--alpha", type=float, default=0.0, help="weight of hard-label CE: alpha*CE + (1-alpha)*T^2*D")
    a("--temperature", type=float, default=1.0, help="KD temperature (the start value with --temperature_end)")
    a("--temperature_end", type=float, default=None,
      help="anneal the temperature to this value at the last step (default: constant --temperature)")
    a("--temperature_schedule", default="linear", choices=["linear", "cosine"], help="shape of the annealing")
    a("--skew_lambda", type=float, default=0.1)
    a("--jsd_beta", type=float, default=0.5)
    a("--top_k", type=int, default=None, help="truncate the teacher to its top-k tokens")


def add_arguments(parser: argparse.ArgumentParser, command: str = "train") -> None:
    _common(parser)
    if command == "distill":
        _distill(parser)
    else:
        parser.add_argument("--model", required=False, help="a preset name or a local HF model folder")


def run(args: argparse.Namespace) -> int:
    from lmdistill.train.loop import run_training

    return run_training(args)
