"""The `lmdistill` command: `lmdistill COMMAND [--config recipe.yaml] [--flag value ...]`.

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`; only the module of
the command being run is imported, so `lmdistill --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from lmdistill import __version__
from lmdistill.config import Parser, UsageError, closest, parse_command_args
from lmdistill.errors import LmdistillError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("lmdistill.quickstart", "the whole path on CPU in minutes: data, tokenizer, teacher, CE vs KD student, eval"),
    "data": ("lmdistill.data.cli", "inspect a data file: counts and rendered examples with trained spans marked"),
    "tokenizer": ("lmdistill.tokenizer", "train a byte-level BPE tokenizer with a ChatML template"),
    "train": ("lmdistill.train.cli", "train a model with cross-entropy (pretraining / SFT)"),
    "distill": ("lmdistill.train.cli", "distill a teacher into a student"),
    "cache-teacher": ("lmdistill.teachers.cli", "precompute a teacher's top-k distribution to disk"),
    "generate": ("lmdistill.generate", "a model writes replies to prompts: training data for sequence-level KD"),
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
        print(f"lmdistill: unknown command '{command}'{closest(command, list(COMMANDS))}. Valid commands: "
              f"{', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        args = parse_args(command, rest)
        _quiet_libraries()
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"lmdistill {command}: error: {exc}", file=sys.stderr)
        return 2
    except LmdistillError as exc:
        print(f"lmdistill {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmdistill {command}: interrupted.", file=sys.stderr)
        return 130


def build_parser(command: str) -> Parser:
    """The option parser of one command (`lmdistill COMMAND --help` shows it)."""
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = Parser(prog=f"lmdistill {command}", description=help_)
    module.add_arguments(parser, command) if _takes_command(module) else module.add_arguments(parser)
    return parser


def parse_args(command: str, argv: Sequence[str]):
    """Options of `lmdistill COMMAND argv...` as the CLI parses them (recipe, types, ranges), for Python callers."""
    args = parse_command_args(build_parser(command), [str(a) for a in argv])  # paths welcome from Python
    args.command = command
    return args


def parse_plan(command: str, argv: Sequence[str]):
    """The frozen run plan of `lmdistill train|distill argv...` (parsed, typed and checked as the CLI does)."""
    from lmdistill.train.options import config_for
    from lmdistill.train.preflight import check

    args = parse_args(command, argv)
    config = config_for(command)(**{k: v for k, v in vars(args).items() if k not in ("config", "command")})
    return check(config.values(), command)


def _quiet_libraries() -> None:
    """transformers' own progress bars ("Loading weights", "Writing model shards") would interleave with ours."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def _takes_command(module) -> bool:
    """Modules serving several commands (train/distill) receive the command name in add_arguments."""
    return module.add_arguments.__code__.co_argcount >= 2
