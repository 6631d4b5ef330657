"""The package's shape: imports flow downwards, run-folder names have one owner, light modules stay light.

Layers, top to bottom (a module may import its own layer or any layer below, never one above), one folder each
(the run folder's owner, its loggers and the figures sit in a layer of their own below the rest of outputs/):

    cli, signature_cli → workflows/ → tasks/ → outputs/ (bundles, submissions, scoring, report page) → inference/ →
    outputs/run_dir, loggers, figures/ → engine/ → models/ → data/ → config/, errors, version

Imports inside `if TYPE_CHECKING:` are type hints only and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"

LAYERS: list[tuple[str, ...]] = [
    ("cli", "__main__", "signature_cli", "finetune"),
    ("workflows",),
    ("tasks",),
    ("outputs",),
    ("inference",),
    ("outputs.run_dir", "outputs.loggers", "outputs.figures"),
    ("engine",),
    ("models",),
    ("data",),
    ("config", "errors", "version"),
]

# Every file a run folder holds; only finetune/outputs/run_dir.py may spell them out.
RUN_FOLDER_FILES = [
    "recipe.yaml", "classes.txt", "class_counts.csv", "skipped_images.csv", "history.csv", "curves.png", "best.pt",
    "last.pt", "report.html", "cv_summary.json", "oof_predictions.csv", "confusion_matrix.png",
    "confusion_matrix.csv", "most_confused.csv", "most_confused.png", "class_recall.png", "classification_report.json",
    "predictions.csv", "metrics.json", "reliability.png", "misclassified.png", "gradcam.png", "score.json", "test_eval",
    "tensorboard_events", "multilabel_confusion.png", "pr_curves.png", "label_errors.csv", "thresholds.csv",
    "accuracy_coverage.png", "pseudo_labels.csv", "semi_summary.json", "abandoned.txt",
    # a tuning study folder (StudyDir)
    "study.db", "study_recipe.yaml", "space.yaml", "trials.csv", "best_recipe.yaml", "importance.png",
    "optimization_history.png",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_NAMES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    keys = [".".join(parts[1:3]), parts[1]] if len(parts) > 1 else [parts[0]]  # the most specific entry wins
    for key in keys:
        for depth, names in enumerate(LAYERS):
            if key in names:
                return depth
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name} and to the README")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Modules of this package that `path` imports at run time (module level or inside functions)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "finetune")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "finetune":
                # `from finetune.models import torchvision_backbones` imports that submodule, not the package's API.
                submodules = {f"{child.module}.{a.name}" for a in child.names} & MODULE_NAMES
                found.update(submodules or {child.module})
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for module, path in MODULES.items():
        for target in _imports(path):
            if _layer(target) < _layer(module):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycles() -> None:
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(trail[trail.index(nxt):] + [node, nxt])
                                     if nxt in trail else f"import cycle through {node} and {nxt}")
            if nxt not in state:
                walk(nxt, trail + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            walk(module, [])


def _string_constants(path: Path) -> list[str]:
    """String literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_run_folder_file_names_live_in_run_py_only() -> None:
    owners: dict[str, set[str]] = {name: set() for name in RUN_FOLDER_FILES}
    for module, path in MODULES.items():
        for text in _string_constants(path):
            for name in RUN_FOLDER_FILES:
                if name in text:
                    owners[name].add(module)
    elsewhere = {name: sorted(mods) for name, mods in owners.items() if mods != {"finetune.outputs.run_dir"}}
    assert not elsewhere, f"run-folder names spelled outside finetune/outputs/run_dir.py (or not at all): {elsewhere}"


def _fresh_import(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_building_models_loads_neither_albumentations_nor_opencv() -> None:
    loaded = _fresh_import("import finetune.models")
    assert "timm" in loaded  # the import really happened
    assert not {"albumentations", "cv2"} & loaded


def test_scoring_two_csvs_loads_no_model_code() -> None:
    loaded = _fresh_import("import finetune.outputs.scoring")
    assert "finetune.outputs.evaluation" in loaded
    assert not {"timm", "finetune.inference.predict", "finetune.inference.gradcam", "finetune.models"} & loaded


def test_importing_the_package_is_light_and_the_api_still_resolves() -> None:
    loaded = _fresh_import("import finetune")
    assert "finetune.workflows.api" not in loaded and "torch" not in loaded
    import finetune
    from finetune.workflows.api import evaluate, predict

    assert finetune.evaluate is evaluate and finetune.predict is predict


def test_modules_are_not_shadowed_by_api_functions() -> None:
    import importlib

    import finetune

    assert importlib.import_module("finetune.outputs.evaluation").__name__ == "finetune.outputs.evaluation"
    with mock.patch("finetune.outputs.submission.write_rows") as patched:
        import finetune.outputs.submission

        assert finetune.outputs.submission.write_rows is patched
    assert callable(finetune.evaluate) and callable(finetune.predict)


def test_recipe_presets_are_the_ones_transforms_build() -> None:
    from finetune.data.transforms import PRESETS
    from finetune.config.recipe import PRESETS as NAMES

    assert set(NAMES) == set(PRESETS)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(("finetune.outputs.figures", "finetune.outputs.report_page"))))
def test_figure_modules_leave_the_matplotlib_backend_alone(module: str) -> None:
    loaded = _fresh_import(f"import {module}")
    assert "matplotlib.pyplot" not in loaded


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path) -> list[str]:
    """`_private` names `path` takes from other modules of the package: `from m import _x` and `m._x`."""
    tree = ast.parse(path.read_text())
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                if f"{node.module}.{alias.name}" in MODULE_NAMES:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "finetune":
                    modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = ast.unparse(node.value)
            if dotted in modules.values() or dotted.split(".")[0] in modules:
                found.append(f"line {node.lineno}: {dotted}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules() -> None:
    used = [f"{module} {use}" for module, path in MODULES.items() for use in _private_uses(path)]
    assert not used, "a _private name is private to its module; make it public (and add it to __all__):\n" + \
        "\n".join(used)


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from finetune.data import sources\nfrom finetune.outputs.submission import _Hidden\nsources._helper()\n")
    assert len(_private_uses(module)) == 2


# The one definition of "am I the main process?" lives in engine/distributed.py; everything else calls it.
MAIN_PROCESS_OWNER = "finetune.engine.distributed"
MAIN_PROCESS_EXEMPT: set[str] = set()  # a module that must decide by hand goes here, with the reason


def _main_process_checks(path: Path) -> list[str]:
    """Places in `path` that decide who is main by hand: a rank compared with 0, or the RANK variable read."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            zero = any(isinstance(o, ast.Constant) and o.value in (0, "0") and not isinstance(o.value, bool)
                       for o in operands)
            if zero and any("rank" in ast.unparse(o).lower() for o in operands):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and node.value == "RANK":
            found.append(f"line {node.lineno}: reads the RANK environment variable")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "main" in node.name and (
                "rank" in node.name or "is_main" in node.name or "main_process" in node.name):
            body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
            delegates = len(body) == 1 and isinstance(body[0], ast.Return) and \
                ast.unparse(body[0].value) == "distributed.is_main()"
            if not delegates:  # a second definition of the check, not a call of the one
                found.append(f"line {node.lineno}: defines {node.name}()")
    return found


def test_only_engine_distributed_decides_who_is_main() -> None:
    checks = [f"{module} {check}" for module, path in MODULES.items()
              if module != MAIN_PROCESS_OWNER and module not in MAIN_PROCESS_EXEMPT
              for check in _main_process_checks(path)]
    assert not checks, "ask engine.distributed.is_main() (or RunDir.is_main) instead of:\n" + "\n".join(checks)


def test_the_main_process_check_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom finetune.engine import distributed\n"
                      "a = distributed.rank() == 0\nb = os.environ.get('RANK', '0') != '0'\nc = 0 < rank\n")
    assert len(_main_process_checks(module)) == 4  # three comparisons and one RANK read
    module.write_text("def is_main_process():\n    return rank() == 0\n\n\n"
                      "def is_main():\n    \"\"\"Delegates.\"\"\"\n    return distributed.is_main()\n")
    assert [c.split(": ")[1] for c in _main_process_checks(module)] == ["defines is_main_process()", "rank() == 0"]
    assert _main_process_checks(MODULES[MAIN_PROCESS_OWNER]), "the owner's own check is what the scan looks for"


def test_every_main_process_exemption_is_still_needed() -> None:
    stale = [m for m in MAIN_PROCESS_EXEMPT if not _main_process_checks(MODULES[m])]
    assert not stale, f"remove {stale} from MAIN_PROCESS_EXEMPT: they no longer decide who is main by hand"


# Issue 23: a public function (methods included) stays a page long and takes a handful of arguments; more
# arguments travel as one small options object (the CLI flattens those into flags).
MAX_LINES, MAX_PARAMETERS = 60, 8
# Public functions still over a limit, "module:qualified name" → why. Each entry is in a file whose split is
# under way elsewhere; remove the entry when that lands (the staleness test below says when).
SIZE_EXEMPT: dict[str, str] = {}  # "module:function": why it may stay over the limits (none today)


def _oversized(path: Path, module: str) -> dict[str, str]:
    """Public functions and methods in `path` over MAX_LINES lines or MAX_PARAMETERS parameters (self/cls not
    counted): "module:qualified name" → their size."""
    found: dict[str, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
                         if a is not None and a.arg not in ("self", "cls")]
                lines = child.end_lineno - child.lineno + 1  # from `def` to the last line of the body
                if not child.name.startswith("_") and (lines > MAX_LINES or len(names) > MAX_PARAMETERS):
                    found[f"{module}:{prefix}{child.name}"] = f"{lines} lines, {len(names)} parameters"
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def test_public_functions_are_short_and_take_few_parameters() -> None:
    found = {name: size for module, path in MODULES.items() for name, size in _oversized(path, module).items()}
    over = [f"{name}: {size}" for name, size in found.items() if name not in SIZE_EXEMPT]
    assert not over, (f"split these (at most {MAX_LINES} lines) or bundle their arguments into an options object "
                      f"(at most {MAX_PARAMETERS} parameters):\n" + "\n".join(over))


def test_the_size_check_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    module.write_text(f"def long():\n{body}\n\n\ndef wide(a, b, c, d, e, f, g, h, *, i):\n    pass\n\n\n"
                      "class K:\n    def fits(self, a, b, c, d, e, f, g, h):\n        pass\n\n"
                      "    def wide(self, a, b, c, d, e, f, g, *h, **i):\n        pass\n\n"
                      "    def _hidden(self, a, b, c, d, e, f, g, h, i):\n        pass\n")
    assert _oversized(module, "m") == {"m:long": "61 lines, 0 parameters", "m:wide": "2 lines, 9 parameters",
                                       "m:K.wide": "2 lines, 9 parameters"}


def test_every_size_exemption_is_still_needed() -> None:
    stale = [name for name in SIZE_EXEMPT if name not in _oversized(MODULES[name.split(":")[0]], name.split(":")[0])]
    assert not stale, f"remove {stale} from SIZE_EXEMPT: they are within the limits now"
