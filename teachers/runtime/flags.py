"""Command-line flags made from a config dataclass: its fields, defaults and field docstrings.

One flag per field: `--field-name`, help = the field's docstring plus its default, type from its
annotation; a bool field that defaults to True becomes `--no-field-name`. Field metadata may add
`choices`, `metavar`, and `nargs`/`const` (an optional value, like `--verify [N]`). Every flag
defaults to `argparse.SUPPRESS`, so only the flags a user gave reach the config and the dataclass
states each default once. Not tyro, simple_parsing or jsonargparse: our public flags are
comma-separated int lists (`--layers 7,15,23,31`) and `--no-x` switches, which those libraries
spell differently.

`parse_config(cls, argv)` is the whole command line of an entry point whose flags are its config's
fields: the parser, then the config, a `ValueError` of its `__post_init__` reported the way
argparse reports a bad flag (usage, the message, exit status 2).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, TypeVar

_PASSED_THROUGH = ("choices", "metavar", "nargs", "const")
T = TypeVar("T")


def ints(text: str) -> tuple[int, ...]:
    """'7,15,23,31' -> (7, 15, 23, 31); '' -> ()."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def finite(text: str) -> float:
    """A float flag: 'nan' and 'inf' parse as floats but no setting means them, and they pass
    every range check (nan <= 0 is False), so they are refused here, by name, for every flag."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def strs(text: str) -> tuple[str, ...]:
    """'a,b' -> ("a", "b"); '' -> ()."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring}: the string literal after each annotated field, subclasses winning."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, after in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _show(value: object) -> str:
    """A default as a user would type it: on/off, 7,15,23,31, unset."""
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _parse_type(hint: Any) -> Callable[[str], Any]:
    """The argparse `type` for an annotation: int, float, str, tuple[int, ...], tuple[str, ...],
    or X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, f"only `X | None` unions make flags, got {hint}"
        hint = args[0]
    if hint is float:
        return finite
    if hint in (int, str):
        return hint
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (int, ...):
        return ints
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        return strs
    raise TypeError(f"no flag type for annotation {hint}")


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = ()
) -> None:
    """Add one flag per field of dataclass `cls` (inherited fields included) but `exclude`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_text = f"{docs.get(f.name, '')} (default: {_show(default)})".strip()
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        kwargs |= {k: f.metadata[k] for k in _PASSED_THROUGH if k in f.metadata}
        name = f.name.replace("_", "-")
        if hints[f.name] is bool:
            flag = f"--no-{name}" if default else f"--{name}"
            if default:  # the flag turns off what the docstring describes
                kwargs["help"] = f"Turns off: {kwargs['help']}"
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            flag = f"--{name}"
            kwargs["type"] = _parse_type(hints[f.name])
        parser.add_argument(flag, **kwargs)


def config_parser(
    cls: type, description: str | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
    """A parser with one flag per field of `cls` (`kwargs` go to `add_config_flags`); the
    description is printed as written (a module docstring with its usage lines)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(parser, cls, **kwargs)
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """`cls` from the command line `argv` (default: `sys.argv[1:]`); a config the dataclass
    refuses exits like a bad flag, with its message."""
    parser = config_parser(cls, description)
    args = vars(parser.parse_args(argv))
    try:
        return cls(**args)
    except ValueError as err:
        parser.error(str(err))
