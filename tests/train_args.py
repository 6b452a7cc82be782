"""Build `lmdistill train/distill` options in tests exactly as the CLI does."""

import argparse

from lmdistill.config import parse_command_args
from lmdistill.train.cli import add_arguments


def make_args(command: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    args = parse_command_args(parser, argv)
    args.command = command
    return args
