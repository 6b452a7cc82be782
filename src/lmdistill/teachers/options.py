"""The options of `lmdistill cache-teacher`, declared once: the command parses them, recipe YAMLs set them and the
Python API's `CacheTeacherConfig` is made from them."""

from __future__ import annotations

import argparse

from lmdistill.config import Parser, config_class


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


_CLASS: list = []


def build_parser() -> Parser:
    parser = Parser(prog="lmdistill cache-teacher", description="precompute a teacher's top-k distribution to disk")
    add_arguments(parser)
    return parser


def config_for() -> type:
    """`CacheTeacherConfig`."""
    if not _CLASS:
        _CLASS.append(config_class("CacheTeacherConfig", "cache-teacher", build_parser(), "lmdistill.api"))
    return _CLASS[0]
