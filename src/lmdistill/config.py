"""Command-line and YAML configuration: `lmdistill COMMAND [--config recipe.yaml] [--flag value ...]`.

Every command declares its options once, on a `Parser` (an `argparse.ArgumentParser` that speaks to users:
one-line errors with the closest valid flag, every option's default in `--help`). A recipe YAML may set any
option by its flag name (without the dashes, any alias accepted, e.g. MiniMind's `out_dir`); flags given on the
command line override the YAML. YAML values go through the same type and range checks as flags, an unknown key
is an error naming the file, the line and the closest valid key, and an option that is required on the command
line may be given in the YAML instead.

Range-checked types for `add_argument(type=...)`: `int_at_least(lo)`, `float_in(lo, hi, ...)`.

The same declarations give the Python API its typed config classes (`config_class`): one dataclass field per
option, each value checked on construction with the flag's own type, range and choices, an unknown keyword
answered with the closest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
from pathlib import Path
from typing import Any, NoReturn, Sequence

import yaml

from lmdistill.errors import LmdistillError


class UsageError(LmdistillError):
    """A bad flag or flag value: the CLI prints it on one line and exits 2, as argparse does."""


# -- range-checked option types ----------------------------------------------------------------------------
def int_at_least(lo: int):
    """An argparse/YAML type: an integer >= lo."""

    def convert(text: Any) -> int:
        try:
            value = int(text) if not isinstance(text, float) or text.is_integer() else None
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(text, bool) or value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, found {text!r}")
        return value

    convert.__name__ = f"integer >= {lo}"
    return convert


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse/YAML type: a finite float in the interval [lo, hi] (either end open, or absent)."""
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    expected = (f"a number in {left}, {right}" if lo is not None and hi is not None
                else f"a number {'>' if lo_open else '>='} {lo:g}" if lo is not None else "a number")

    def convert(text: Any) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        ok = math.isfinite(value) and not isinstance(text, bool)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
        return value

    convert.__name__ = expected
    return convert


def number_list(cast, ok, expected: str):
    """An argparse/YAML type: `a,b` (or a YAML list) -> [cast(a), cast(b)], each passing `ok`."""

    def convert(text: Any) -> list:
        items = text if isinstance(text, list) else str(text).split(",")
        try:
            values = [cast(x) for x in items]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
        return values

    convert.__name__ = expected
    return convert


STEP_COUNTS = number_list(int, lambda c: c >= 1, "step counts >= 1 separated by commas (e.g. 300,200)")
POSITIVE_WEIGHTS = number_list(float, lambda w: 0 < w < float("inf"), "comma-separated positive numbers")
DTYPES = ("float32", "bfloat16", "float16")


class Repeated(argparse.Action):
    """A flag that may be given several times, collected in a list (`--teacher A --teacher B`). Given on the
    command line, it replaces a recipe's list instead of adding to it; a recipe may give a list or one value."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_repeated_seen", set())
        current = getattr(namespace, self.dest) if self.dest in seen else []
        seen.add(self.dest)
        setattr(namespace, self.dest, [*current, values])


# -- the parser ---------------------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none worth saying, or says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


class Parser(argparse.ArgumentParser):
    """argparse with errors for users: one line naming the flag and the closest valid flag, no usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a prefix silently picking another flag is worse than an error
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. `{self.prog} --help` lists every option.")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            flag = next((a for a in extra if a.startswith("-")), extra[0])
            name = flag.split("=", 1)[0]
            raise UsageError(f"unknown option '{name}'{closest(name, self.option_names())}. "
                             f"`{self.prog} --help` lists every option.")
        return parsed

    def option_names(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


def closest(name: str, valid: Sequence[str]) -> str:
    """' (did you mean X?)' for the most similar valid name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


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


def _yaml_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A YAML value through the option's own type and choices, so a recipe is checked like a flag."""
    if action.nargs == 0:  # store_true flags (None: a switch whose default is "unset")
        if not isinstance(value, bool) and not (value is None and action.default is None):
            raise LmdistillError(f"{where}: '{key}' is a switch; expected true or false, found {value!r}.")
        return value
    if isinstance(action, Repeated) and value is not None and not isinstance(value, list):
        value = [value]
    if action.type is not None and value is not None:
        convert = action.type
        try:
            # a repeatable flag converts each item; a list-valued type (`0.5,0.5` or a YAML list) takes the list
            value = [convert(v) for v in value] if isinstance(action, Repeated) else convert(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise LmdistillError(f"{where}: '{key}': {exc}.") from None
    values = value if isinstance(action, Repeated) and isinstance(value, list) else [value]
    if action.choices is not None and value is not None and any(v not in action.choices for v in values):
        raise LmdistillError(f"{where}: '{key}' must be one of {', '.join(map(str, action.choices))}; "
                             f"found {value!r}.")
    return value


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe YAML into `{dest: value}`, checking every key and value against the parser's options."""
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
    return check_values(parser, data, lambda key: f"{path}:{lines.get(key, '?')}")


def check_values(parser: argparse.ArgumentParser, data: dict[str, Any], where) -> dict[str, Any]:
    """`{option name or alias: value}` (a recipe, a Python config) -> `{dest: value}`, each value through its
    option's type, range and choices like a flag; `where(key)` names the place for errors (file:line, Class.key)."""
    table = _key_to_action(parser)
    values: dict[str, Any] = {}
    for key, value in data.items():
        action = table.get(str(key))
        if action is None:
            raise LmdistillError(f"{where(str(key))}: unknown key '{key}' for this command"
                                 f"{closest(str(key), list(table))}. Valid keys: "
                                 f"{', '.join(sorted({a.dest for a in table.values()}))}.")
        values[action.dest] = _yaml_value(action, str(key), value, where(str(key)))
    return values


def parse_command_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv` for one command, with `--config recipe.yaml` values as defaults under the flags."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="recipe YAML; command-line flags override it")
    config = _config_path(argv)
    if config:
        values = load_recipe(config, parser)
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the recipe
        parser.set_defaults(**values)
    args = parser.parse_args(list(argv))
    args.__dict__.pop("_repeated_seen", None)
    return args


def _config_path(argv: Sequence[str]) -> str | None:
    """The value of --config in argv (read before parsing, so required options may come from the recipe)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv):
                raise UsageError("argument --config: expected a YAML file after --config")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


# -- registries of parts ----------------------------------------------------------------------------------
class Registry(dict):
    """Named parts (teacher kinds, batch sources) in registration order. `version` changes with every
    registration or removal, so what is made from the parts' options (config classes, parsers) is made again."""

    def __init__(self, what: str):
        super().__init__()
        self.what, self.version = what, 0

    def register(self, part: type) -> type:
        """Register (or replace) a part under its `name`; usable as a class decorator."""
        if not getattr(part, "name", ""):
            raise LmdistillError(f"{part.__name__}: a {self.what} needs a name.")
        self[part.name] = part
        self.version += 1
        return part

    def unregister(self, name: str) -> None:
        """Remove a registered part (a plugin's, a test's)."""
        self.pop(name, None)
        self.version += 1

    def part(self, name: str) -> type:
        try:
            return self[name]
        except KeyError:
            raise LmdistillError(f"unknown {self.what} '{name}'; registered: {', '.join(self)}.") from None


# -- typed config objects ------------------------------------------------------------------------------------
class ConfigBase:
    """A command's options as a typed object (see `config_class`): `command` names the command, `values()` gives
    `{dest: value}` with every value checked, and construction already checks what it was given."""

    command: str = ""
    _parser: Any = None  # the parser the class was made from

    def values(self) -> dict[str, Any]:
        """Every option's value, checked like a flag (assignments after construction included); the required
        options must be set."""
        name, parser = type(self).__name__, type(self)._parser
        values = check_values(parser, dataclasses.asdict(self), lambda key: name)
        missing = [a.dest for a in parser._actions if a.required and values.get(a.dest) is None]
        if missing:
            raise LmdistillError(f"{name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required.")
        return values


def config_class(name: str, command: str, parser: argparse.ArgumentParser, module: str) -> type:
    """A dataclass with one field per option of `parser` (its dest, default and help), named `name`. Keywords are
    checked on construction: an unknown one names the closest valid option, a value goes through its option's type,
    range and choices, with the messages a recipe gets (`DistillConfig: 'alpha': expected ...`)."""
    actions = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")]
    fields = [(a.dest, Any, dataclasses.field(default=a.default, metadata={"help": a.help or ""})) for a in actions]
    doc = f"Options of `lmdistill {command}` (see `lmdistill {command} --help`):\n\n" + "\n".join(
        f"    {a.dest} = {a.default!r}: {a.help}" for a in actions)

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not f.default}
        check_values(parser, given, lambda key: name)

    cls = dataclasses.make_dataclass(name, fields, bases=(ConfigBase,), namespace={
        "__doc__": doc, "command": command, "_parser": parser, "__post_init__": __post_init__})
    cls.__module__ = module
    init = cls.__init__
    valid = [a.dest for a in actions]

    def checked_init(self, *args, **kwargs):
        unknown = next((k for k in kwargs if k not in valid), None)
        if unknown is not None:
            raise LmdistillError(f"{name}: unknown option '{unknown}'{closest(unknown, valid)}. "
                                 f"`help({name})` lists every option.")
        init(self, *args, **kwargs)

    checked_init.__signature__ = inspect.signature(init)  # help() and IDEs show the fields
    cls.__init__ = checked_init
    return cls
