"""Unlabeled images: the HW03 2021 semi-supervised layout, temperature calibration, reject-below, pseudo-labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import COLOURS, make_image
from finetune.workflows.opening import prepare_data
from finetune.errors import FinetuneError
from finetune.config.recipe import DataConfig, Recipe


def write_hw03_2021(root: Path, per_class: int = 8, val_per_class: int = 3, unlabeled: int = 12,
                    test: int = 6) -> Path:
    """food-11 2021: training/labeled/<NN>/, training/unlabeled/00/, validation/<NN>/, testing/00/.

    Unlabeled images are named <true label>_<n>.jpg (HW03's own naming), so pseudo-label accuracy can be read.
    """
    colours, seed = list(COLOURS.values()), 5000
    for split, count in (("training/labeled", per_class), ("validation", val_per_class)):
        for label, colour in enumerate(colours):
            folder = root / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                make_image(colour, seed).save(folder / f"{label}_{i}.jpg")
    for split, count in (("training/unlabeled/00", unlabeled), ("testing/00", test)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed += 1
            make_image(colours[i % 3], seed).save(folder / (f"{i % 3}_{i}.jpg" if "unlabeled" in split
                                                            else f"{i:04d}.jpg"))
    return root


@pytest.fixture
def food_2021(tmp_path: Path) -> Path:
    return write_hw03_2021(tmp_path / "food-11")


def test_auto_layout_reads_labeled_unlabeled_and_testing(food_2021: Path) -> None:
    lines: list[str] = []
    prepared = prepare_data(Recipe(data=DataConfig(root=str(food_2021))), lines.append)
    assert prepared.classes == ["00", "01", "02"]
    assert len(prepared.train) == 24 and len(prepared.val) == 9
    assert prepared.unlabeled_dir == food_2021 / "training" / "unlabeled"
    assert prepared.test_dir == food_2021 / "testing" / "00"
    assert any("training/labeled/<class>/" in line for line in lines)
    assert any("unlabeled images: 12" in line for line in lines)


def test_labeled_unlabeled_folders_are_never_classes_unless_asked(food_2021: Path) -> None:
    with pytest.raises(FinetuneError, match="labeled/unlabeled split, not classes"):
        prepare_data(Recipe(data=DataConfig(root=str(food_2021), train="training", val=None)), print)
    # Saying so (layout: folder) takes them as two classes.
    prepared = prepare_data(Recipe(data=DataConfig(root=str(food_2021), train="training", val=None, layout="folder",
                                              unlabeled=None)), print)
    assert prepared.classes == ["labeled", "unlabeled"] and prepared.unlabeled_dir is None


def test_recipe_names_the_folders(food_2021: Path, tmp_path: Path) -> None:
    other = food_2021 / "extra_pool"
    other.mkdir()
    make_image((1, 2, 3), 1).save(other / "a.jpg")
    prepared = prepare_data(Recipe(data=DataConfig(root=str(food_2021), train="training/labeled",
                                              unlabeled="extra_pool", test="testing/00")), print)
    assert prepared.unlabeled_dir == other and prepared.classes == ["00", "01", "02"]
    with pytest.raises(FinetuneError, match="data.unlabeled"):
        prepare_data(Recipe(data=DataConfig(root=str(food_2021), unlabeled="nowhere")), print)


def test_a_class_called_unlabeled_stays_a_class(tmp_path: Path) -> None:
    for name in ("cat", "unlabeled"):
        folder = tmp_path / "d" / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            make_image((200, 10, 10) if name == "cat" else (10, 10, 200), i).save(folder / f"{i}.jpg")
    prepared = prepare_data(Recipe(data=DataConfig(root=str(tmp_path / "d"))), print)
    assert prepared.classes == ["cat", "unlabeled"] and prepared.unlabeled_dir is None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("scale", [4.0, 0.3])  # over-confident, then under-confident (label smoothing, mixup)
def test_fitted_temperature_lowers_nll_and_ece_of_misscaled_logits(scale: float) -> None:
    from finetune.engine.temperature import apply_temperature, fit_temperature, nll
    from finetune.outputs.figures.calibration import calibration_bins

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 5))
    # Labels drawn from softmax(logits): those logits are calibrated, so the fit must undo `scale`.
    labels = np.array([rng.choice(5, p=p) for p in _softmax(logits)])
    misscaled = logits * scale
    temperature = fit_temperature(misscaled, labels)
    assert temperature == pytest.approx(scale, rel=0.15)  # it recovers the scale that was applied
    assert nll(misscaled, labels, temperature) < nll(misscaled, labels) - 0.02
    before = calibration_bins(_softmax(misscaled), labels).ece
    after = calibration_bins(apply_temperature(_softmax(misscaled), temperature), labels).ece
    assert after < before / 2 and after < 0.03
    # Rescaling probabilities equals the softmax of the rescaled logits.
    np.testing.assert_allclose(apply_temperature(_softmax(misscaled), temperature), _softmax(misscaled / temperature),
                               atol=1e-5)


def test_accuracy_coverage_and_threshold_for_target() -> None:
    from finetune.outputs.figures.calibration import accuracy_coverage

    # Confidences 0.9, 0.8, 0.7, 0.6 (two classes); the two most confident right, then wrong, then right.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    curve = accuracy_coverage(probs, [0, 0, 0, 0])
    np.testing.assert_allclose(curve.coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.accuracy, [1.0, 1.0, 2 / 3, 0.75])
    assert curve.threshold_for(0.95) == (0.8, 0.5)
    assert curve.threshold_for(0.7) == (0.6, 1.0)
    assert accuracy_coverage(probs, [1, 1, 0, 1]).threshold_for(0.5) == (None, 0.0)


@pytest.fixture(scope="module")
def trained_2021(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, best.pt) of one tiny run on the 2021 layout, shared by the tests below."""
    import torch

    from conftest import TINY_OVERRIDES
    from finetune.cli import main

    tmp = tmp_path_factory.mktemp("semi")
    root = write_hw03_2021(tmp / "food-11")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "quick_cpu", "--data", str(root), *sum((["--set", o] for o in TINY_OVERRIDES), []),
                     "--set", "train.epochs=3", "--set", f"output={tmp / 'runs'}", "--set", "name=t"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, tmp / "runs" / "t" / "best.pt"


def test_training_stores_a_temperature_and_evaluation_reports_ece_before_and_after(trained_2021) -> None:
    import json

    from finetune.engine.checkpoint import read_checkpoint
    from finetune.outputs.run_dir import RunDir

    _, best = trained_2021
    temperature = read_checkpoint(best)["temperature"]
    assert 0.05 <= temperature <= 20
    run = RunDir.open(best)
    metrics = json.loads(run.eval.metrics.read_text())
    assert metrics["temperature"] == pytest.approx(temperature)
    assert {"ece", "coverage"} <= set(metrics)
    assert ("ece_uncalibrated" in metrics) == (temperature != 1.0)
    assert set(metrics["coverage"]["targets"]) == {"0.9", "0.95", "0.99"}
    assert run.eval.coverage_png.is_file() and run.eval.reliability.is_file()
    assert "Accuracy against coverage" in run.report.read_text()


def test_old_checkpoints_without_temperature_predict_uncalibrated(trained_2021, tmp_path: Path) -> None:
    from finetune.engine.checkpoint import read_checkpoint, save_checkpoint
    from finetune.inference.predict import load_model

    _, best = trained_2021
    payload = read_checkpoint(best)
    old = tmp_path / "old.pt"
    save_checkpoint(old, {k: v for k, v in payload.items() if k != "temperature"})
    assert load_model(old).temperature == 1.0
    assert load_model(best).temperature == pytest.approx(payload["temperature"])


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_testing_gives_hw03_ids_calibrated_probs_and_rejects(trained_2021, tmp_path: Path) -> None:
    from finetune.cli import main
    from finetune.engine.temperature import apply_temperature

    root, best = trained_2021
    out = tmp_path / "sub.csv"
    common = ["predict", str(best), "--images", str(root / "testing"), "--id-format", "index", "--id-width", "0",
              "--index-start", "0", "--workers", "0", "--probs"]
    assert main([*common, "--out", str(out)]) == 0
    rows, probs = _rows(out), _rows(out.with_name("sub_probs.csv"))
    assert [r["Id"] for r in rows] == ["0", "1", "2", "3", "4", "5"]  # HW03 2021: 0.. in file-name order
    top = np.array([[float(r[c]) for c in ("00", "01", "02")] for r in probs])
    # The probabilities written are the calibrated ones: softmax(z / T), not softmax(z).
    from finetune.data.sources import Sample
    from finetune.inference.predict import ProbsSettings, load_model, predict_probs

    loaded = load_model(best)
    raw = predict_probs(loaded, [Sample(p) for p in sorted((root / "testing" / "00").iterdir())],
                        ProbsSettings(8, 0, calibrated=False))
    np.testing.assert_allclose(top, apply_temperature(raw, loaded.temperature), atol=2e-5)
    cut = float(np.median(top.max(axis=1)))
    rejected = tmp_path / "rejected.csv"
    assert main([*common, "--out", str(rejected), "--reject-below", str(cut), "--reject-label", "unsure"]) == 0
    labels = [r["Category"] for r in _rows(rejected)]
    expected = ["unsure" if p.max() < cut else ["00", "01", "02"][p.argmax()] for p in top]
    assert labels == expected and "unsure" in labels


def _truth_csv(root: Path, path: Path) -> Path:
    """The unlabeled pool's answers, from the <label>_<n>.jpg names write_hw03_2021 gives them."""
    images = sorted((root / "training" / "unlabeled" / "00").iterdir())
    path.write_text("Id,Category\n" + "".join(f"{p.stem},{int(p.stem.split('_')[0]):02d}\n" for p in images))
    return path


def test_pseudo_label_writes_confident_images_as_a_folder_or_a_csv(trained_2021, tmp_path: Path) -> None:
    from finetune.cli import main
    from finetune.data.sources import read_labelled_folder
    from finetune.inference.predict import load_model

    root, best = trained_2021
    pool = root / "training" / "unlabeled"
    truth = _truth_csv(root, tmp_path / "truth.csv")
    table = tmp_path / "pl.csv"
    assert main(["pseudo-label", str(best), "--images", str(pool), "--out", str(table), "--format", "csv",
                 "--threshold", "0.01", "--truth", str(truth), "--workers", "0"]) == 0
    rows = _rows(table)
    assert len(rows) == 12  # threshold 0.01: every image of the pool, with its probability and truth
    assert all(float(r["probability"]) >= 1 / 3 - 1e-6 for r in rows)
    assert {r["true_label"] for r in rows} == {"00", "01", "02"}
    # The CSV is a manifest that data.layout: csv trains on.
    recipe = Recipe(data=DataConfig(root=str(tmp_path), layout="csv", csv=str(table), val=None))
    assert len(prepare_data(recipe, print).train) + len(prepare_data(recipe, print).val) == 12

    # A stricter threshold and at most 1 per class, as class folders.
    cut = sorted(float(r["probability"]) for r in rows)[4]
    out = tmp_path / "pl_folder"
    assert main(["pseudo-label", str(best), "--images", str(pool), "--out", str(out), "--threshold", str(cut),
                 "--max-per-class", "1", "--workers", "0"]) == 0
    found = read_labelled_folder(out, "folder", "")
    assert 1 <= len(found.items) <= 3 and len({name for _, name in found.items}) == len(found.items)
    best_rows = {}
    for r in rows:
        if float(r["probability"]) >= cut:
            best_rows.setdefault(r["label"], []).append(r)
    kept = {max(rs, key=lambda r: float(r["probability"]))["path"].rsplit("/", 1)[1] for rs in best_rows.values()}
    assert {path.name for path, _ in found.items} == kept  # the most confident of each class
    assert load_model(best).classes == ["00", "01", "02"]
    # The output folder is never written inside the pool, and an existing one is not overwritten.
    assert main(["pseudo-label", str(best), "--images", str(pool), "--out", str(pool / "x")]) == 2
    assert main(["pseudo-label", str(best), "--images", str(pool), "--out", str(out), "--workers", "0"]) == 2


def test_semi_recipe_runs_teacher_and_student_rounds_with_a_summary(food_2021: Path, tmp_path: Path,
                                                                   one_torch_thread) -> None:
    import json

    from conftest import TINY_OVERRIDES
    from finetune.cli import main
    from finetune.outputs.run_dir import RunDir

    truth = _truth_csv(food_2021, tmp_path / "truth.csv")
    sets = [*TINY_OVERRIDES, f"output={tmp_path / 'runs'}", "name=semi", "semi.rounds=2", "semi.threshold=0.34",
            "semi.max_per_class=3", "semi.student_augment=medium", f"semi.truth={truth}"]
    assert main(["train", "quick_cpu", "--data", str(food_2021), *sum((["--set", s] for s in sets), [])]) == 0
    parent = RunDir(tmp_path / "runs" / "semi")
    summary = json.loads(parent.semi_summary.read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for r in summary["rounds"][1:]:
        assert sum(r["pseudo_labels_per_class"].values()) == r["pseudo_labels"] <= 9  # at most 3 per class
        assert r["train_images"] == 24 + r["pseudo_labels"]
        assert r["pseudo_label_accuracy"] is None or 0.0 <= r["pseudo_label_accuracy"] <= 1.0
    for name in ("round0", "round1", "round2"):
        child = RunDir(parent.path / name)
        assert child.best.is_file() and child.eval.metrics.is_file()
    assert RunDir(parent.path / "round0").pseudo_labels.is_file()  # the labels round 0's model gave round 1
    student = Recipe.from_dict(__import__("yaml").safe_load(RunDir(parent.path / "round1").recipe.read_text()))
    assert student.augment.preset == "medium" and student.semi.rounds == 0
    assert Path(summary["final_checkpoint"]) == RunDir(parent.path / "round2").best


def test_semi_settings_are_checked(food_2021: Path) -> None:
    from finetune.cli import main
    from finetune.config.recipe import load_recipe

    for bad, key in (("semi.threshold=1.5", "semi.threshold"), ("semi.rounds=-1", "semi.rounds"),
                     ("semi.max_per_class=0", "semi.max_per_class"), ("semi.student_augment=wild", "semi.student_augment")):
        with pytest.raises(FinetuneError, match=key):
            load_recipe("quick_cpu", [bad])
    assert main(["train", "quick_cpu", "--data", str(food_2021), "--folds", "2", "--set", "semi.rounds=1"]) == 2
    # No unlabeled folder anywhere: the rounds cannot start, and say which key to set.
    with pytest.raises(FinetuneError, match="semi.unlabeled"):
        from finetune.workflows.semi import train_semi

        train_semi("quick_cpu", data=food_2021, overrides=["semi.rounds=1", "data.unlabeled=null"])
