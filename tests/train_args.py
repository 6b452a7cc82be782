"""Build `lmdistill train/distill` options in tests exactly as the CLI does."""

import argparse

from lmdistill.cli import parse_args


def make_args(command: str, argv: list[str]) -> argparse.Namespace:
    return parse_args(command, [str(a) for a in argv])
