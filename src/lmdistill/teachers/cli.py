"""`lmdistill cache-teacher`: run a teacher once over a data file and keep its top-k distribution on disk.

    lmdistill cache-teacher --teacher runs/teacher --data train.jsonl --output_dir cache/ --top_k 64
    lmdistill distill --teacher_cache cache/ --student nano --data train.jsonl --output_dir runs/kd
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmdistill.teachers.options import add_arguments as declare

    declare(parser)


def run(args: argparse.Namespace) -> int:
    from lmdistill.teachers.cache_run import cache_teacher
    from lmdistill.teachers.options import config_for

    cache_teacher(config_for()(**{k: v for k, v in vars(args).items() if k not in ("config", "command")}))
    return 0
