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

from lmdistill.train.options import add_arguments  # noqa: F401 - the command's options, declared once


def run(args: argparse.Namespace) -> int:
    from lmdistill.train.options import config_for
    from lmdistill.train.run import run_command

    config = config_for(args.command)(**{k: v for k, v in vars(args).items() if k not in ("config", "command")})
    return run_command(config.values(), args.command)
