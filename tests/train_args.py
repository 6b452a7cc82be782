"""Build `lmdistill train/distill` runs in tests exactly as the CLI does: options parsed, typed, checked into the
frozen run plan the Trainer reads."""

from lmdistill.cli import parse_plan


def make_plan(command: str, argv: list):
    return parse_plan(command, [str(a) for a in argv])
