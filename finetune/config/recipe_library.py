"""The recipes that ship inside the package: list them, find one by name, show or copy it.

The checkout's `recipes/` folder is the only copy in git; setuptools installs it as the package
data `finetune.recipes` (see pyproject.toml), so an installed wheel has every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional, Union

from finetune.errors import FinetuneError

__all__ = ["ShippedRecipe", "shipped_recipes", "shipped_recipe", "find_recipe", "copy_recipe"]


@dataclass(frozen=True)
class ShippedRecipe:
    """A recipe file that comes with the package."""

    name: str
    path: Path

    @property
    def purpose(self) -> str:
        """The first sentence of its header comment (what the recipe is for), at most about 100 characters."""
        words: list[str] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            text = line.lstrip("#").strip()
            if not line.startswith("#") or (not text and words):
                break
            words += text.split()
        sentence = " ".join(words).split(". ")[0].rstrip(".")
        return sentence if len(sentence) <= 100 else sentence[:100].rsplit(" ", 1)[0] + " …"


def _recipes_folder() -> Path:
    try:
        return Path(str(files("finetune.recipes")))
    except ModuleNotFoundError:  # a source checkout put on PYTHONPATH without installing it
        return Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> dict[str, ShippedRecipe]:
    """Every shipped recipe by name (the file name without .yaml), in name order."""
    folder = _recipes_folder()
    recipes = {p.stem: ShippedRecipe(p.stem, p) for p in sorted(folder.glob("*.yaml"))}
    if not recipes:
        raise FinetuneError(f"no shipped recipes in {folder}: this installation of finetune is incomplete; "
                            "reinstall it (pip install --force-reinstall finetune)")
    return recipes


def shipped_recipe(name: str) -> ShippedRecipe:
    """One shipped recipe by name (`quick_cpu` or `quick_cpu.yaml`)."""
    recipes = shipped_recipes()
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in recipes:
        raise FinetuneError(f"no shipped recipe named {name!r}; shipped recipes: {', '.join(recipes)} "
                            "(`finetune recipes` lists them with their purpose)")
    return recipes[stem]


def find_recipe(recipe: Union[str, Path]) -> Path:
    """The YAML file a recipe argument means: an existing path wins, else a shipped recipe of that name."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise FinetuneError(f"recipe {path} is a folder; give a recipe YAML file or a shipped recipe's name")
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    recipes = shipped_recipes()
    if stem in recipes and (len(path.parts) == 1 or path.parent.name == "recipes"):
        return recipes[stem].path  # `quick_cpu`, or the README's `recipes/quick_cpu.yaml` outside the checkout
    raise FinetuneError(f"recipe file not found: {path}; give a path to a recipe YAML or the name of a shipped "
                        f"recipe: {', '.join(recipes)}")


def copy_recipe(name: str, dest: Optional[Union[str, Path]] = None) -> Path:
    """Write an editable copy of a shipped recipe to `dest` (a file, or a folder to put NAME.yaml in); never overwrites."""
    recipe = shipped_recipe(name)
    target = Path(dest).expanduser() if dest is not None else Path(recipe.path.name)
    if target.is_dir():
        target = target / recipe.path.name
    if target.exists():
        raise FinetuneError(f"{target} already exists; choose another destination or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(recipe.path.read_text(encoding="utf-8"), encoding="utf-8")
    return target
