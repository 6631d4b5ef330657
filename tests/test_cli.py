"""The CLI is generated from the API: defaults, choices and help are the functions' own; README commands parse."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing

import pytest
from test_readme import COMMANDS as README_COMMANDS, cli_args

from finetune.cli import COMMANDS, build_parser, main
from finetune.config.options import ID_FORMATS, VALUE_KINDS, InferenceOptions, SubmissionOptions
from finetune.config.recipe import PRECISIONS
from finetune.signature_cli import doc_entries


def subparser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (`datasets fashion-mnist` included), as the CLI builds it."""
    parser = build_parser(name.split(" ")[0])
    for word in name.split(" "):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def api_defaults(name: str) -> dict[str, object]:
    """Every default the command's API function declares, options-object fields as `param.field`."""
    defaults: dict[str, object] = {}
    function = COMMANDS[name].function()
    hints = typing.get_type_hints(function)
    for param in inspect.signature(function).parameters.values():
        members = typing.get_args(hints.get(param.name))  # an options object (not a recipe, which may be a name)
        options = None if str in members else next((t for t in members if dataclasses.is_dataclass(t)), None)
        if options is not None:
            defaults.update({f"{param.name}.{f.name}": f.default for f in dataclasses.fields(options)})
        else:
            defaults[param.name] = param.default
    return defaults


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_cli_default_is_the_api_default(name: str) -> None:
    defaults = api_defaults(name)
    options = [a for a in subparser(name)._actions if a.dest != "help"]
    assert options, name
    for action in options:
        assert action.dest in defaults, f"{name}: {action.dest} is no parameter of {COMMANDS[name].target}"
        declared = defaults[action.dest]
        if declared is inspect.Parameter.empty:  # required: the user gives it
            assert action.required or action.nargs == "+", (name, action.dest)
        else:
            assert action.default == declared, (name, action.dest, action.default, declared)


def test_choices_are_the_tuples_the_validation_uses() -> None:
    choices = {a.dest: a.choices for a in subparser("predict")._actions}
    assert choices["inference.precision"] is PRECISIONS
    assert choices["submission.value"] is VALUE_KINDS
    assert choices["submission.id_format"] is ID_FORMATS


def _flat(text: str) -> str:
    """Help as argparse wraps it (also after a hyphen), back on one line."""
    return re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text.replace("%%", "%")))


def test_predict_help_shows_each_parameters_docstring(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    shown = _flat(capsys.readouterr().out)
    import finetune

    texts = [doc_entries(finetune.predict)[1][name] for name in ("checkpoint", "images", "out")]
    texts += list(doc_entries(SubmissionOptions)[1].values()) + list(doc_entries(InferenceOptions)[1].values())
    assert len(texts) == 3 + len(dataclasses.fields(SubmissionOptions)) + len(dataclasses.fields(InferenceOptions))
    for text in texts:
        assert _flat(text).rstrip(".") in shown, text
    assert "(default 64)" in shown and "(default submission.csv)" in shown and "--workers" in shown


def test_every_option_is_documented_and_no_default_is_copied_by_hand() -> None:
    for name in COMMANDS:
        for action in subparser(name)._actions:
            text = action.help or ""
            assert text and not text.startswith(" ("), f"{name}: {action.dest} has no Args:/Attributes: entry"
            assert text.count("(default") <= 1, (name, action.dest, text)


@pytest.mark.parametrize("argv", [cli_args(a) for a in README_COMMANDS if cli_args(a) and "--version" not in a],
                         ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_command_parses(argv: list[str]) -> None:
    """Also the README commands test_readme cannot run here: every flag they spell exists."""
    args = build_parser(argv[0]).parse_args(argv)
    name = next(n for n in COMMANDS if n.split(" ")[0] == argv[0] and (" " not in n or n.split(" ")[1] == argv[1]))
    assert args._command.target == COMMANDS[name].target


def test_readme_spellings_reach_the_api_parameters() -> None:
    args = build_parser("predict").parse_args(["predict", "a.pt", "b.pt", "--images", "test", "--workers", "0",
                                                "--probs", "--id-format", "index", "--precision", "bf16", "--tta", "flip"])
    assert args.checkpoint == ["a.pt", "b.pt"] and args.images == "test"
    assert getattr(args, "inference.num_workers") == 0 and getattr(args, "inference.tta") == "flip"
    assert getattr(args, "submission.probs") is True and getattr(args, "submission.id_format") == "index"
    train = build_parser("train").parse_args(["train", "quick_cpu", "--set", "a=1", "--set", "b=2", "--folds", "3"])
    assert train.overrides == ["a=1", "b=2"] and train.folds == 3 and train.devices == 1


def test_a_bad_choice_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "x.pt", "--images", "d", "--precision", "fp8"])
    assert exit_.value.code == 2 and "fp8" in capsys.readouterr().err
