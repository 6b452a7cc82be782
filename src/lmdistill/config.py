"""Command-line and YAML configuration: `lmdistill COMMAND [--config recipe.yaml] [--flag value ...]`.

Every command declares its options once, on an `argparse.ArgumentParser`. A recipe YAML may set any of
them by its flag name (without the dashes, any alias accepted, e.g. MiniMind's `out_dir`); flags given on
the command line override the YAML. An unknown YAML key is an error naming the file and line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml

from lmdistill.errors import LmdistillError


def _key_to_action(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Map every long option name (without dashes) and every dest to its action."""
    table: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config", argparse.SUPPRESS):
            continue
        table[action.dest] = action
        for opt in action.option_strings:
            if opt.startswith("--"):
                table[opt[2:]] = action
                table[opt[2:].replace("-", "_")] = action
    return table


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe YAML into `{dest: value}`, checking every key against the parser's options."""
    path = Path(path)
    if not path.is_file():
        raise LmdistillError(f"--config: expected a YAML file, found no file at '{path}'.")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LmdistillError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmdistillError(
            f"{path}: expected a mapping of option names to values at the top level, found {type(data).__name__}."
        )
    lines = {k.value: k.start_mark.line + 1 for k, _ in root.value} if root is not None else {}
    table = _key_to_action(parser)
    values: dict[str, Any] = {}
    for key, value in data.items():
        action = table.get(str(key))
        where = f"{path}:{lines.get(str(key), '?')}"
        if action is None:
            valid = ", ".join(sorted(a.dest for a in set(table.values())))
            raise LmdistillError(f"{where}: unknown key '{key}' for this command. Valid keys: {valid}.")
        if action.choices is not None and value not in action.choices:
            raise LmdistillError(
                f"{where}: '{key}' must be one of {sorted(map(str, action.choices))}, found {value!r}."
            )
        values[action.dest] = value
    return values


def parse_command_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv` for one command, with `--config recipe.yaml` values as defaults under the flags."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="recipe YAML; command-line flags override it")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_recipe(pre.config, parser))
    return parser.parse_args(argv)
