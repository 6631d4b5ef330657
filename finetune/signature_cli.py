"""Command-line sub-commands generated from API functions: their signatures, type hints and docstrings.

Each parameter becomes an option (or a positional) with the function's default, its type, the choices
named for it, and the help text of its Google-style `Args:` entry; a dataclass-typed parameter (an
options object) is flattened into one option per field, documented by the class's `Attributes:`.
So `finetune predict --help` and `help(finetune.predict)` read from the same text.

Why a small generator rather than jsonargparse (or typer/click): it is about a hundred lines on the
standard library, and the README's flag spellings (`--workers`, `--set`, `--images`, flat options-object
fields such as `--batch-size` rather than `--inference.batch_size`) would need per-flag configuration
there too; a new dependency would not have earned its place for what is left.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import importlib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

__all__ = ["Command", "doc_entries", "add_command", "call"]

_EMPTY = inspect.Parameter.empty
_SKIPPED = ("log",)  # where progress lines go: the console, always


@dataclass(frozen=True)
class Command:
    """One sub-command: the API function it calls and the few ways its options differ from the generated ones."""

    target: str  # "module:function", imported only when the command is built
    positional: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)  # parameter or field name → its option's spelling
    choices: Mapping[str, str] = field(default_factory=dict)  # parameter → "module:CONSTANT", the tuple it checks
    nargs: Mapping[str, str] = field(default_factory=dict)  # list parameters given as `--x A B` (else repeated)
    hide: tuple[str, ...] = ()  # options-object fields the function does not use

    def function(self) -> Callable[..., Any]:
        """The API function, imported now."""
        return _constant(self.target)


def _constant(path: str) -> Any:
    """What "module:name" names, imported now."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def doc_entries(obj: Any) -> tuple[str, dict[str, str]]:
    """An object's one-line summary and the text of each entry in its `Args:` / `Attributes:` section."""
    doc = inspect.getdoc(obj) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ").strip()
    entries: dict[str, str] = {}
    section, current = False, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Attributes:"):
            section, current = True, None
        elif not line.startswith("    "):  # a blank line or the next paragraph ends the section
            section = False
        elif section and line.startswith("        ") and current:
            entries[current] += " " + line.strip()
        elif section:
            current, _, text = line.strip().partition(":")
            entries[current] = text.strip()
    return summary, entries


def _unwrap(tp: Any) -> tuple[Optional[type], bool]:
    """(the type one command-line value converts to, whether the parameter takes a list); (None, _) if none."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        listed = [m for m in members if typing.get_origin(m) in (list, collections.abc.Sequence)]
        for member in listed + members:  # a parameter that takes one or several (checkpoints) takes a list
            kind = _unwrap(member)
            if kind[0] is not None:
                return kind
        return None, False
    if origin in (list, collections.abc.Sequence):
        return _unwrap(typing.get_args(tp)[0])[0], True
    if tp in (str, int, float, bool):
        return tp, False
    if isinstance(tp, type) and issubclass(tp, os.PathLike):  # a path is typed as text
        return str, False
    return None, False


def _options_class(tp: Any) -> Optional[type]:
    """The dataclass a parameter takes (an options object), if it takes one (and not a name of one, as a recipe)."""
    if str in typing.get_args(tp):
        return None
    for member in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(member):
            return member
    return None


def _help(text: str, default: Any, kind: Optional[type]) -> str:
    text = text.replace("%", "%%")  # argparse formats help with %
    if default in (_EMPTY, None) or kind is bool or default == [] or default == ():
        return text
    shown = repr(default) if isinstance(default, str) and not default.strip() else default  # a space stays visible
    return f"{text.rstrip('.')} (default {shown})."


def _add(parser: argparse.ArgumentParser, command: Command, name: str, dest: str, tp: Any, default: Any,
         text: str, choices: Optional[tuple]) -> None:
    kind, many = _unwrap(tp)
    if kind is None:
        if default is _EMPTY:
            raise TypeError(f"{command.target}: required parameter {name} has no command-line type ({tp})")
        return
    spec: dict[str, Any] = {"help": _help(text, default, kind)}
    if choices is not None:
        spec["choices"] = choices
    if kind is not bool:
        spec["type"] = kind
    if name in command.positional:
        if many:
            spec["nargs"] = "+" if default is _EMPTY else "*"
        elif default is not _EMPTY:
            spec["nargs"] = "?"
        if default is not _EMPTY:
            spec["default"] = default
        parser.add_argument(dest, **spec)
        return
    flag = command.flags.get(name, "--" + name.replace("_", "-"))
    spec.update(dest=dest, required=default is _EMPTY, default=None if default is _EMPTY else default)
    if kind is not bool and choices is None:  # argparse shows the choices in place of a metavar
        spec["metavar"] = name.upper()
    if kind is bool:
        spec["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif many:
        if name in command.nargs:
            spec["nargs"] = command.nargs[name]
        else:
            spec["action"] = "append"
    parser.add_argument(flag, **spec)


def add_command(commands: argparse._SubParsersAction, name: str, command: Command,
                help: Optional[str] = None) -> argparse.ArgumentParser:
    """A sub-parser for `command`, every option generated from its function."""
    func = command.function()
    summary, docs = doc_entries(func)
    parser = commands.add_parser(name, help=help or summary, description=summary)
    hints = typing.get_type_hints(func)
    options: dict[str, type] = {}
    for param in inspect.signature(func).parameters.values():
        if param.name in _SKIPPED:
            continue
        cls = _options_class(hints.get(param.name))
        if cls is None:
            choices = _constant(command.choices[param.name]) if param.name in command.choices else None
            _add(parser, command, param.name, param.name, hints.get(param.name), param.default,
                 docs.get(param.name, ""), choices)
            continue
        options[param.name] = cls
        _, fields_doc = doc_entries(cls)
        field_hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if item.name not in command.hide:
                _add(parser, command, item.name, f"{param.name}.{item.name}", field_hints[item.name], item.default,
                     fields_doc.get(item.name, ""), item.metadata.get("choices"))
    parser.set_defaults(_command=command, _options=options)
    return parser


def call(args: argparse.Namespace) -> Any:
    """Call the parsed command's function with every option, options objects built (and so validated) first."""
    command: Command = args._command
    func = command.function()
    kwargs: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {name: {} for name in args._options}
    for key, value in vars(args).items():
        owner, dot, item = key.partition(".")
        if dot and owner in grouped:
            grouped[owner][item] = value
        elif key in inspect.signature(func).parameters:
            kwargs[key] = value
    for name, cls in args._options.items():
        kwargs[name] = cls(**grouped[name])
    return func(**kwargs)
