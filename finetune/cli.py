"""Command line: one sub-command per API function, its options generated from that function's signature.

The table below holds only what a signature cannot say: which parameters are positional, and the
README's spellings that differ from the parameter names. Defaults, types, choices and help come from
the functions and options objects themselves (finetune/signature_cli.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Optional

from finetune.errors import FinetuneError
from finetune.signature_cli import Command, add_command, call

__all__ = ["COMMANDS", "SPELLINGS", "main", "build_parser"]

# Parameter names whose option is spelled otherwise, in every command.
SPELLINGS = {"num_workers": "--workers", "overrides": "--set"}

COMMANDS: dict[str, Command] = {
    "train": Command("finetune.workflows.launch:train_command", positional=("recipe",)),
    "augment": Command("finetune.workflows.preview:augment_preview", positional=("recipe",)),
    "lr-find": Command("finetune.workflows.preview:lr_find", positional=("recipe",)),
    "evaluate": Command("finetune.workflows.api:evaluate", positional=("checkpoint",)),
    "predict": Command("finetune.workflows.api:predict", positional=("checkpoint",)),
    "pseudo-label": Command("finetune.workflows.semi:pseudo_label", positional=("checkpoint",),
                            hide=("precision", "tta")),
    "score": Command("finetune.workflows.score_report:score_command", positional=("submission",)),
    "report": Command("finetune.workflows.launch:report_command", positional=("run_dir",)),
    "export": Command("finetune.workflows.sharing:export", positional=("checkpoint",), flags={"fmt": "--format"},
                      choices={"fmt": "finetune.workflows.sharing:FORMATS",
                               "quantize": "finetune.inference.quantize:QUANTIZE_CHOICES"}),
    "app": Command("finetune.workflows.app:run_app", positional=("checkpoint",)),
    "audit": Command("finetune.workflows.audit:audit", positional=("source",)),
    "inspect": Command("finetune.workflows.launch:inspect_backbone", positional=("backbone",),
                       choices={"pool": "finetune.config.recipe:POOLS"}, nargs={"trainable": "*", "hidden": "*"}),
    "tune": Command("finetune.workflows.tune:tune", positional=("recipe",)),
    "runs": Command("finetune.workflows.runs_table:runs_table", positional=("root",),
                    flags={"csv_out": "--csv", "html_out": "--html"}),
    "recipes": Command("finetune.workflows.launch:recipes_command", positional=("action", "name", "dest"),
                       choices={"action": "finetune.workflows.launch:RECIPE_ACTIONS"}),
    "datasets fashion-mnist": Command("finetune.workflows.launch:fashion_mnist_command",
                                      choices={"layout": "finetune.workflows.datasets:LAYOUTS"}),
    "datasets fashion-mnist-multilabel": Command("finetune.workflows.launch:fashion_mnist_multilabel_command"),
    "datasets shard": Command("finetune.workflows.sharding:shard_command", positional=("data",)),
    "demo": Command("finetune.workflows.demo:run_demo"),
}
GROUPS = {"datasets": ("write a ready-made data set as an image folder, or a folder as shards", "DATASET")}  # help, metavar


class _VersionAction(argparse.Action):
    """`finetune --version`: the versions a bug report needs, and the device training would use."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import timm
        import torch
        import torchvision

        from finetune.version import __version__

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
        else:
            device = "cpu (no CUDA device found)"
        print(f"finetune {__version__}\ntorch {torch.__version__}\ntorchvision {torchvision.__version__}\n"
              f"timm {timm.__version__}\ndevice {device}")
        parser.exit()


def _with_spellings(command: Command) -> Command:
    return Command(command.target, command.positional, {**SPELLINGS, **command.flags}, command.choices,
                   command.nargs, command.hide)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The `finetune` parser; `only` builds just that command (or group), sparing the imports of the others."""
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained image classifiers.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the finetune, torch, torchvision and timm versions and the device, then exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        group, _, member = name.rpartition(" ")
        if only is not None and (group or member) != only:
            continue
        if group and group not in groups:
            text, metavar = GROUPS[group]
            sub = commands.add_parser(group, help=text, description=text)
            groups[group] = sub.add_subparsers(dest=group, required=True, metavar=metavar)
        add_command(groups[group] if group else commands, member, _with_spellings(command))
    return parser


def _chosen(argv: list[str]) -> Optional[str]:
    """The command named on the command line; "" when none (and no --help asks for them all)."""
    names = {name.split(" ")[0] for name in COMMANDS}
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    if first in names:
        return first
    return None if {"-h", "--help"} & set(argv) else ""


_STORAGE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; user mistakes print one `error:` line and exit with status 2.

    Under torchrun only rank 0 prints (the other ranks' stdout is discarded; errors still reach stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    torchrun = False
    if "LOCAL_RANK" in os.environ:  # only torchrun's workers need torch.distributed: plain commands start light
        from finetune.engine import distributed

        torchrun = distributed.launched_by_torchrun()
        if torchrun and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")
    try:
        args = build_parser(_chosen(argv)).parse_args(argv)
        result = call(args)
        if isinstance(result, str):
            print(result)
        elif isinstance(result, int) and not isinstance(result, bool):
            return result  # an exit status: that of the torchrun workers this command started
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in _STORAGE_ERRORS:
            raise
        # The checks before each command's work catch an unwritable output; this catches what they cannot
        # foresee (a disk that fills up, a file made read-only mid-run) with the same one line.
        print(f"error: {err.strerror}: {err.filename or 'a file being written'}; free space or fix the permissions "
              "there, or choose another --out / output", file=sys.stderr)
        return 2
    finally:
        if torchrun:
            distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
