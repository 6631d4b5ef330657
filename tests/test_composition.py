"""Every feature composes with both tasks: {single-label, multi-label} × {1 process, 2 gloo processes} ×
{plain training with data.cache: ram, --folds 2, a 2-checkpoint ensemble predicted under --precision bf16,
pseudo-labels}. Each 2-process cell must give what its 1-process twin gives.

The runs use no random augmentation, no dropout and a BatchNorm-free model (timm's test_convnext), so one
process with batch 2B and two with batch B see the same global batches. Torchrun starts cost seconds on
2 cores, so each cell combines what it can (the ensemble is the two folds' checkpoints).
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK_CPU, write_folder_dataset
from test_distributed import _finetune, _sets
from test_multilabel import write_multilabel_dataset

from finetune.workflows import api
from finetune.workflows.kfold import train_kfold
from finetune.config.options import InferenceOptions, PseudoLabelOptions, SubmissionOptions
from finetune.config.recipe import TASKS
from finetune.workflows.semi import pseudo_label

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
BASE = ["model.backbone=test_convnext", "data.image_size=32", "data.num_workers=0", "train.epochs=2",
        "train.lr=0.01", "train.warmup_epochs=0", "augment.preset=none", "model.head.dropout=0",
        "model.head.hidden=[]", "model.trainable_last=1", "data.cache=ram"]
TASK_SETTINGS = {
    "single": [],
    "multilabel": ["data.task=multilabel", "data.layout=csv", "data.csv=labels.csv", "data.csv_image_dir=images",
                   "train.monitor=val_map"],
}


def _rows(path: Path) -> list[list[str]]:
    with path.open() as handle:
        return list(csv.reader(handle))


def _numbers(rows: list[list[str]]) -> list[list]:
    """CSV rows with numeric cells as floats (compared with a tolerance), the rest as text."""
    def cell(value: str):
        try:
            return float(value)
        except ValueError:
            return value
    return [[cell(value) for value in row] for row in rows]


def _same_rows(a: list[list[str]], b: list[list[str]], tolerance: float = 2e-4) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(_numbers(a), _numbers(b)):
        assert row_a == pytest.approx(row_b, abs=tolerance)


@pytest.fixture(scope="module", params=list(TASK_SETTINGS))
def cells(request, tmp_path_factory):
    """Both twins of every cell for one task: in this process (1) and under torchrun (2 gloo processes)."""
    task = request.param
    tmp = tmp_path_factory.mktemp(task)
    if task == "single":
        data = write_folder_dataset(tmp / "data", per_class=8, val_per_class=3, test=6)
        pool = data / "test"
    else:
        data = write_multilabel_dataset(tmp / "data", count=32, test=6)
        pool = data / "test"
    settings = BASE + TASK_SETTINGS[task]
    quiet = lambda line: None  # noqa: E731
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.train(QUICK_CPU, data=data, overrides=settings + ["data.batch_size=16", f"output={tmp / 'one'}",
                                                                "name=plain"], log=quiet)
        folds = train_kfold(QUICK_CPU, 2, data=data, log=quiet,
                            overrides=settings + ["data.batch_size=8", f"output={tmp / 'one'}", "name=cv"])
        inference = InferenceOptions(num_workers=0, precision="bf16")
        api.predict(folds.checkpoints, pool, out=tmp / "one" / "ensemble.csv", log=quiet, inference=inference,
                    submission=SubmissionOptions(probs=True))
        pseudo_label(folds.checkpoints[0], pool, tmp / "one" / "pseudo.csv",
                     PseudoLabelOptions(threshold=0.6, format="csv"), InferenceOptions(num_workers=0), log=quiet)
    finally:
        torch.set_num_threads(previous)
    two = tmp / "two"
    commands = {
        "plain": ["train", QUICK_CPU, "--data", str(data),
                  *_sets(settings + ["data.batch_size=8", f"output={two}", "name=plain"])],
        "folds": ["train", QUICK_CPU, "--data", str(data), "--folds", "2",
                  *_sets(settings + ["data.batch_size=8", f"output={two}", "name=cv"])],
        "ensemble": ["predict", *map(str, folds.checkpoints), "--images", str(pool), "--out", str(two / "ensemble.csv"),
                     "--workers", "0", "--precision", "bf16", "--probs"],
        "pseudo": ["pseudo-label", str(folds.checkpoints[0]), "--images", str(pool), "--out", str(two / "pseudo.csv"),
                   "--threshold", "0.6", "--format", "csv", "--workers", "0"],
    }
    outputs = {}
    for name, args in commands.items():
        done = _finetune(*args)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        outputs[name] = done
    return {"task": task, "one": tmp / "one", "two": two, "outputs": outputs, "folds": folds}


def test_plain_training_with_a_ram_cache_matches_one_process(cells):
    one, two = cells["one"] / "plain", cells["two"] / "plain"
    _same_rows([r[:-1] for r in _rows(one / "history.csv")], [r[:-1] for r in _rows(two / "history.csv")])
    _same_rows(_rows(one / "eval" / "predictions.csv"), _rows(two / "eval" / "predictions.csv"))
    assert json.loads((two / "eval" / "metrics.json").read_text()).get("task", "single") == cells["task"]


def test_k_fold_matches_one_process(cells):
    one = json.loads((cells["one"] / "cv" / "cv_summary.json").read_text())
    two = json.loads((cells["two"] / "cv" / "cv_summary.json").read_text())
    assert one["metric"] == two["metric"] == ("accuracy" if cells["task"] == "single" else "samples_f1")
    assert [f["score"] for f in one["folds"]] == pytest.approx([f["score"] for f in two["folds"]], abs=1e-4)
    assert one["oof_score"] == pytest.approx(two["oof_score"], abs=1e-4)


def test_bf16_ensemble_prediction_matches_one_process(cells):
    one, two = cells["one"] / "ensemble.csv", cells["two"] / "ensemble.csv"
    assert _rows(one) == _rows(two)
    _same_rows(_rows(one.with_name("ensemble_probs.csv")), _rows(two.with_name("ensemble_probs.csv")), 1e-3)
    header = _rows(one)[0]
    assert header == ["Id", "Category" if cells["task"] == "single" else "Tags"]


def test_pseudo_labels_match_one_process_and_one_process_writes(cells):
    one, two = _rows(cells["one"] / "pseudo.csv"), _rows(cells["two"] / "pseudo.csv")
    assert one[0][:3] == ["path", "label", "probability"]
    _same_rows([r[1:] for r in one], [r[1:] for r in two], 1e-4)
    assert cells["outputs"]["pseudo"].stdout.count("wrote ") == 1  # rank 0 alone writes and prints


def test_multi_label_pseudo_labels_refuse_class_folders_for_an_inherent_reason(cells, tmp_path):
    if cells["task"] == "single":
        pytest.skip("class folders hold one label per image: the single-label case is test_semi's")
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="one label per image.*--format csv"):
        pseudo_label(cells["folds"].checkpoints[0], cells["one"].parent / "data" / "test", tmp_path / "out",
                     PseudoLabelOptions(format="folder"), log=lambda line: None)


def _task_comparisons(path: Path) -> list[str]:
    """`== "multilabel"`-style comparisons (and `in` tests) against a task name in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                names = [operand] if isinstance(operand, ast.Constant) else getattr(operand, "elts", [])
                if any(isinstance(n, ast.Constant) and n.value in TASKS for n in names):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_only_the_task_implementations_and_the_recipe_schema_ask_which_task_it_is():
    allowed = {PACKAGE / "config" / "recipe.py", *(PACKAGE / "tasks").glob("*.py")}
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path not in allowed for hit in _task_comparisons(path)]
    assert not found, f"modules branching on the task name (ask the Task instead): {found}"
    probe = Path(__file__).with_name("_task_probe.py")  # the check itself finds a planted comparison
    try:
        probe.write_text('def f(cfg):\n    return cfg.task == "multilabel"\n')
        assert len(_task_comparisons(probe)) == 1
    finally:
        probe.unlink()
