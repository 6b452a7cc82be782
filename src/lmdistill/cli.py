"""The `lmdistill` command: `lmdistill COMMAND [--config recipe.yaml] [--flag value ...]`.

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`; only the module of
the command being run is imported, so `lmdistill --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lmdistill import __version__
from lmdistill.config import parse_command_args
from lmdistill.errors import LmdistillError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("lmdistill.quickstart", "the whole path on CPU in minutes: data, tokenizer, teacher, CE vs KD student, eval"),
    "data": ("lmdistill.data.cli", "inspect a data file: counts and rendered examples with trained spans marked"),
    "tokenizer": ("lmdistill.tokenizer", "train a byte-level BPE tokenizer with a ChatML template"),
    "train": ("lmdistill.train.cli", "train a model with cross-entropy (pretraining / SFT)"),
    "distill": ("lmdistill.train.cli", "distill a teacher into a student"),
    "cache-teacher": ("lmdistill.teachers.cli", "precompute a teacher's top-k distribution to disk"),
    "generate": ("lmdistill.generate", "generate training data with a teacher"),
    "eval": ("lmdistill.eval.cli", "evaluate models: perplexity, bits/byte, agreement with a teacher, task accuracy"),
    "report": ("lmdistill.report", "plots and a markdown report from run directories"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return (
        f"usage: lmdistill COMMAND [--config recipe.yaml] [--flag value ...]\n\ncommands:\n{rows}\n\n"
        "Run `lmdistill COMMAND --help` for a command's options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"lmdistill {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lmdistill: unknown command '{command}'. Valid commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"lmdistill {command}: not available in this version yet.", file=sys.stderr)
            return 1
        raise
    parser = argparse.ArgumentParser(prog=f"lmdistill {command}", description=help_)
    module.add_arguments(parser, command) if _takes_command(module) else module.add_arguments(parser)
    try:
        args = parse_command_args(parser, rest)
        args.command = command
        return int(module.run(args) or 0)
    except LmdistillError as exc:
        print(f"lmdistill {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmdistill {command}: interrupted.", file=sys.stderr)
        return 130


def _takes_command(module) -> bool:
    """Modules serving several commands (train/distill) receive the command name in add_arguments."""
    return module.add_arguments.__code__.co_argcount >= 2
