"""Every command in the README runs as written from a folder that is not the checkout, or is skipped for a stated reason.

Commands that need nothing but the installed package run here (from an empty temporary folder).
The others need something this machine lacks (your data set, a trained checkpoint) or take
minutes; they are listed with that reason, and their recipe and `--set` values are still checked,
so a renamed recipe or key in the README fails this test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional

import pytest
from conftest import REPO

from finetune.cli import main
from finetune.config.recipe import load_recipe

README = REPO / "README.md"
RECIPE_COMMANDS = ("train", "augment", "lr-find", "tune")
INPUT_OPTIONS = ("--data", "--images", "--truth", "--resume", "--sample-submission", "--space")


def readme_commands() -> list[list[str]]:
    """Each shell command of the README's ```bash blocks, split as a shell would (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def cli_args(argv: list[str]) -> Optional[list[str]]:
    """The finetune CLI arguments of a command (`finetune ...` or `python -m finetune ...`), else None."""
    if argv[0] == "finetune":
        return argv[1:]
    if argv[:3] == ["python", "-m", "finetune"]:
        return argv[3:]
    return None


def _missing_input(args: list[str]) -> Optional[str]:
    """The first input a command reads that does not exist here (a data folder, a checkpoint, a CSV)."""
    for i, arg in enumerate(args):
        named = i > 0 and args[i - 1] in INPUT_OPTIONS
        if named or arg.endswith((".pt", ".csv")):
            if not Path(arg).expanduser().exists():
                return arg
    return None


def why_not_run(argv: list[str]) -> Optional[str]:
    """Why a README command is not run by this test, or None when it runs here."""
    args = cli_args(argv)
    if args is None:
        return "sets up the machine or builds the package: .ci/run and .ci/package_check run these"
    if args[0] == "demo":
        return "the demo takes minutes; .ci/package_check runs a small one from the installed wheel"
    if args[0] == "datasets":
        return "writes Fashion-MNIST into the folder it names (test_datasets.py covers it on a temporary folder)"
    if args[0] == "runs" and not Path(args[1] if args[1:2] and not args[1].startswith("-") else "runs").is_dir():
        return "needs run folders, which this machine does not have (test_runs_table.py makes some)"
    first = args[1] if args[1:2] and not args[1].startswith("-") else ""
    if "/" in first and not Path(first).expanduser().exists():  # a run folder or checkpoint to read (a recipe
        return f"needs {first}, which this machine does not have"  # given by name has no slash)
    missing = _missing_input(args)
    if missing:
        return f"needs {missing}, which this machine does not have"
    return None


COMMANDS = readme_commands()
IDS = [" ".join(argv)[:60] for argv in COMMANDS]


def test_the_readme_has_commands_to_check() -> None:
    assert len(COMMANDS) > 20
    assert any(why_not_run(argv) is None for argv in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=IDS)
def test_readme_command(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the checkout: recipes come from the package
    args = cli_args(argv)
    if args and args[0] in RECIPE_COMMANDS and args[1:2] and not args[1].startswith("-"):
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        load_recipe(args[1], overrides)  # the recipe resolves and every --set is a valid key and value
    reason = why_not_run(argv)
    if reason:
        pytest.skip(reason)
    try:
        code = main(args)
    except SystemExit as exit_:  # --version prints and exits, as argparse's own --version does
        code = exit_.code
    assert code == 0, f"README command failed: {' '.join(argv)}"
