"""Command-line options generated from a method's config dataclass.

Every field of the chosen method's config is an option: `--field-name VALUE`
(underscores become dashes), booleans as `--name/--no-name`, a field's
`metadata["cli"]` renames it (ExpertWeaver's `tasks` is `--profile-tasks`) and
`metadata["help"]` is its help text. `--opt key=value` sets any field by its
Python name. A method registered by user code gets its options with no CLI edit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ..core.method import MethodConfig
from ..errors import InputError


@dataclasses.dataclass
class MethodOption:
    field: str  # the config's field name
    flag: str  # --flag-name
    kind: type  # bool, int, float or str
    default: Any
    help: str


def _kind(annotation: Any) -> type:
    """The scalar type of a field annotation such as `int | None`."""
    args = typing.get_args(annotation) if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union else ()
    for t in (args or (annotation,)):
        if t in (bool, int, float, str):
            return t
    return str


def method_options(cls: type[MethodConfig]) -> list[MethodOption]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + str(f.metadata.get("cli", f.name)).replace("_", "-")
        out.append(MethodOption(f.name, flag, _kind(hints.get(f.name, str)), default, str(f.metadata.get("help", ""))))
    return out


def _convert(opt: MethodOption, text: str, method: str) -> Any:
    try:
        if opt.kind is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        return opt.kind(text)
    except ValueError:
        raise InputError(f"{method}: {opt.flag} takes {opt.kind.__name__} values, got {text!r}.") from None


def parse_method_args(cls: type[MethodConfig], args: list[str], opts: list[str] | None = None) -> dict[str, Any]:
    """Keyword options for `cls` from the command line's extra arguments and `--opt key=value` items."""
    options = method_options(cls)
    by_flag = {o.flag: o for o in options}
    by_name = {o.field: o for o in options}
    known = ", ".join(o.flag for o in options) or "none"
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise InputError(f"unexpected argument {arg!r}; options start with --. Method {cls.method!r} options: {known}.")
        name, eq, value = arg.partition("=")
        negated = name.startswith("--no-") and name[:2] + name[5:] in by_flag and by_flag[name[:2] + name[5:]].kind is bool
        opt = by_flag.get(name[:2] + name[5:] if negated else name)
        if opt is None:
            raise InputError(f"method {cls.method!r} has no option {name}; its options: {known} (see `moeify methods {cls.method}`).")
        if opt.kind is bool:
            values[opt.field] = (not negated) if not eq else _convert(opt, value, cls.method) ^ negated
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise InputError(f"{name} needs a value.")
            value = args[i + 1]
            i += 1
        values[opt.field] = _convert(opt, value, cls.method)
        i += 1
    for item in opts or []:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in by_name:
            raise InputError(f"--opt {item!r}: write key=value with a field of {cls.method!r}: {', '.join(by_name) or 'none'}.")
        values[key] = _convert(by_name[key], value.strip(), cls.method)
    return values


def split_positionals(cls: type[MethodConfig], tokens: list[str]) -> tuple[list[str], list[str]]:
    """(positional arguments, method-option tokens) of the command line's extra arguments.

    Unknown options reach the command in order with any positional argument mixed in, and click may even hand
    an option name to the optional MODEL argument (`moeify convert --layout S3A3E8 -o out`: MODEL='--layout');
    the method's own options say which of them take a value, so the two can be told apart here.
    """
    by_flag = {o.flag: o for o in method_options(cls)}
    positionals: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            positionals.append(tok)
            i += 1
            continue
        name, eq, _ = tok.partition("=")
        base = name[:2] + name[5:] if name.startswith("--no-") and name[:2] + name[5:] in by_flag else name
        opt = by_flag.get(base)
        # an unknown option is refused by parse_method_args; meanwhile it keeps the value that follows it
        takes_value = not eq and (opt.kind is not bool if opt is not None else not tokens[i + 1:i + 2] == [] and not tokens[i + 1].startswith("--"))
        options.append(tok)
        if takes_value and i + 1 < len(tokens):
            options.append(tokens[i + 1])
            i += 1
        i += 1
    return positionals, options


__all__ = ["MethodOption", "method_options", "parse_method_args", "split_positionals"]
