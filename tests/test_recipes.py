"""Every recipe in recipes/ loads against the code and takes a training step, so none can rot.

Weights are switched off (random init, no download) and images are tiny; each recipe still
goes through its own data layout, augmentation, backbone, freezing, unfreezing schedule and
learning-rate groups.

Each recipe starts with a `#` comment header (big_vision style) that holds, besides free text,
three machine-readable lines, each `# key: value` on one line:

    # command: finetune train <name> --data DIR                   the exact command (a shipped recipe's name)
    # hardware: ...                                              the CPU/GPU it was measured on (or needs)
    # result: <accuracy 0.xx>, <time: 289 s / 5 min>; measured with <how>
    # result: not run here (<why>)                               when nobody measured it: never a guess

Indented `#   ...` lines may follow with details (more commands, per-seed figures).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, write_folder_dataset, write_hw03_dataset
from torch import nn

from finetune.cli import build_parser
from finetune.config.recipe_library import find_recipe, shipped_recipes
from finetune.data.loaders import ImageDataset, make_loader
from finetune.data.sources import discover
from finetune.data.transforms import build_train_transform
from finetune.engine.optim import create_optimizer, create_scheduler
from finetune.models import build_model, plan_unfreezing
from finetune.config.recipe import load_recipe

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
HEADER_KEY = re.compile(r"^# (command|hardware|result): (.+)$")
CHEAP = ["data.image_size=32", "data.batch_size=4", "data.num_workers=0", "model.pretrained=false",
         "model.weights=null"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe_data")
    return {
        "filename": write_hw03_dataset(root / "hw03", per_class=4, val_per_class=2, test=2),
        "folder": write_folder_dataset(root / "folders", per_class=4, val_per_class=2, test=2),
    }


def test_there_are_recipes_for_the_classic_networks() -> None:
    backbones = {load_recipe(path).model.backbone for path in RECIPE_FILES}
    wanted = {"tv/resnet101", "tv/resnet50", "tv/vgg16_bn", "tv/densenet121", "squeezenet1_1",
              "tf_efficientnet_lite0", "convnext_tiny", "hw03net"}
    assert wanted <= backbones


def header_fields(text: str) -> dict[str, list[str]]:
    """The `# command:`, `# hardware:` and `# result:` lines of the leading comment block, by key."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break  # the header ends at the first YAML line; comments further down are not the header
        match = HEADER_KEY.match(line)
        if match:
            fields.setdefault(match.group(1), []).append(match.group(2).strip())
    return fields


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.name for p in RECIPE_FILES])
def test_recipe_header_says_how_to_run_it_and_what_it_gave(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "a recipe starts with a comment header (big_vision style)"
    fields = header_fields(text)
    assert set(fields) == {"command", "hardware", "result"}, f"header keys {sorted(fields)}; see the docstring"
    assert all(len(values) == 1 for values in fields.values()), "one line per key"
    (command,), (hardware,), (result,) = fields["command"], fields["hardware"], fields["result"]

    # The command is the real CLI call for this file: parsed by the CLI's own parser, not just text.
    argv = shlex.split(command, comments=True)
    assert argv[:3] == ["finetune", "train", path.stem], command
    assert find_recipe(argv[2]) == shipped_recipes()[path.stem].path, "the name finds this very file when installed"
    args = build_parser().parse_args(argv[1:])
    assert args.data, "the command says which data folder it trains on (--data)"
    load_recipe(path, args.overrides)  # any --set in the command is a valid override

    assert re.search(r"\b(CPU|GPU)\b", hardware), f"name the hardware: {hardware!r}"
    if "not run here" not in result:
        # A claimed result carries an accuracy, how long it took, and how it was measured.
        assert re.search(r"accuracy|val_acc", result) and re.search(r"\b0?\.\d+|\d+(\.\d+)?\s*%", result), result
        assert re.search(r"\d\s*(s|min|minutes|seconds|h|hours)\b", result), f"no time in {result!r}"
        assert "measured with" in result, f"say how it was measured: {result!r}"
    assert load_recipe(path).name == path.stem, "the run folder is named after the recipe file"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.name for p in RECIPE_FILES])
def test_recipe_takes_a_training_step(path: Path, datasets: dict[str, Path]) -> None:
    torch.manual_seed(0)
    recipe = load_recipe(path, CHEAP)
    if recipe.data.task == "multilabel":  # its model, freezing and schedule, stepped on the class folders here
        recipe.data = dataclasses.replace(recipe.data, task="single", layout="folder", csv=None, csv_image_dir=None)
    recipe.data.root = str(datasets["filename" if recipe.data.layout == "filename" else "folder"])
    splits = discover(recipe.data, recipe.train.seed)
    model, preprocessing = build_model(recipe.model, len(splits.classes), recipe.data.image_size)
    aug = recipe.augment
    transform = build_train_transform(preprocessing, aug.preset, aug.ops, aug.policy, seed=recipe.train.seed)
    loader = make_loader(ImageDataset(splits.train, transform), recipe.data.batch_size, 0, shuffle=True)
    images, labels = next(iter(loader))

    plan = plan_unfreezing(model, recipe.train)
    optimizer = create_optimizer(model, recipe.train, plan.ever_trainable)
    scheduler = create_scheduler(optimizer, recipe.train, steps_per_epoch=1)
    named = dict(model.named_parameters())
    for epoch in sorted(plan.steps):  # epoch 1, then every epoch where the schedule unfreezes more
        plan.apply(model, epoch)
        trainable = plan.trainable_at(epoch)
        before = {n: p.detach().clone() for n, p in named.items()}
        model.train()
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        assert logits.shape == (len(labels), len(splits.classes))
        assert math.isfinite(loss.item())
        changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
        assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
        assert {n for n in named if n.startswith("head.")} <= changed
        newly = trainable - plan.trainable_at(epoch - 1) if epoch > 1 else set()
        assert not newly or newly & changed, f"epoch {epoch}: the unfrozen stages did not train"
