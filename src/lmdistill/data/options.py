"""The data options every command that reads data declares the same way: `--data` (alias MiniMind's
`--data_path`), `--data_format`, `--skip_bad_records`, and where the tokenized store lives and how many processes
build it (`--data_cache`, `--num_proc`)."""

from __future__ import annotations

import argparse

from lmdistill.config import int_at_least
from lmdistill.data.formats import FORMATS

DATA_FORMATS = ("auto", *FORMATS)


def add_data_arguments(parser: argparse.ArgumentParser, data_help: str, *, several: bool = False,
                       skip_bad_records: bool = True, store: bool = True) -> None:
    """--data (one file, or `several` with nargs="+"), --data_format and, unless told not to, --skip_bad_records and
    the store's --num_proc / --data_cache."""
    a = parser.add_argument
    a("--data", "--data_path", dest="data", required=True, help=data_help,
      **({"nargs": "+", "metavar": "FILE"} if several else {}))
    a("--data_format", default="auto", choices=DATA_FORMATS,
      help="record shape of the data (auto: detected from the first record)")
    if skip_bad_records:
        a("--skip_bad_records", action="store_true",
          help="skip malformed records (counted and reported) instead of failing")
    if store:
        a("--num_proc", type=int_at_least(1), default=None,
          help="processes that tokenize the data into its store the first time it is seen (default: every core)")
        a("--data_cache", default=None, metavar="DIR",
          help="where tokenized stores live (default: $LMDISTILL_CACHE/data, else ~/.cache/lmdistill/data)")
