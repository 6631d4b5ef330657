"""`finetune audit`: a planted mislabel, duplicate and leak are found, the data folder is untouched, the cleaned
manifest and data.exclude feed back into training, a missing extra is one line, and the page renders."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS, COLOURS, PROBE, TINY_OVERRIDES, make_image, write_folder_dataset
from finetune import AuditOptions, FinetuneError, audit
from finetune.cli import main
from finetune.config.recipe import load_recipe
from finetune.workflows.opening import open_training, prepare_data

pytest.importorskip("cleanlab")
quiet = lambda line: None  # noqa: E731



def _planted(root: Path) -> dict[str, Path]:
    """A folder data set with a red image filed under blue, a test image copied into training under another name,
    and a re-encoded copy of a training image beside it (PNG, the same pixels: not the same bytes)."""
    write_folder_dataset(root, per_class=14, val_per_class=4, test=6)
    mislabelled = root / "train" / "blue" / "blue_planted.jpg"
    make_image(COLOURS["red"], 4242).save(mislabelled)
    leak = root / "train" / "green" / "holiday_photo.jpg"
    shutil.copyfile(root / "test" / "0002.jpg", leak)  # test images cycle red, green, blue: 0002 is green
    original = root / "train" / "red" / "red_3.jpg"
    resized = root / "train" / "red" / "red_3_again.png"
    with Image.open(original) as image:
        image.save(resized)
    return {"mislabelled": mislabelled, "leak": leak, "test_copy": root / "test" / "0002.jpg",
            "original": original, "resized": resized}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    root = tmp / "shapes"
    planted = _planted(root)
    before = _snapshot(root)
    lines: list[str] = []
    result = audit(None, data=root, out=tmp / "audit", options=AuditOptions(folds=3),
                   overrides=TINY_OVERRIDES + [f"output={tmp / 'runs'}"], write_manifest=tmp / "cleaned.csv",
                   log=lines.append)
    return result, root, planted, before, lines, tmp


def test_features_audit_finds_the_planted_mislabel_leak_and_near_copy(audited):
    result, root, planted, before, lines, _ = audited
    issues = _rows(result.folder / "label_issues.csv")
    assert issues and issues[0]["path"] == str(planted["mislabelled"]), issues[:3]
    assert (issues[0]["given"], issues[0]["suggested"]) == ("blue", "red")
    assert [float(r["quality"]) for r in issues] == sorted(float(r["quality"]) for r in issues)  # worst first
    pairs = {frozenset((r["path_a"], r["path_b"])): r for r in _rows(result.folder / "duplicates.csv")}
    leak = pairs[frozenset((str(planted["leak"]), str(planted["test_copy"])))]
    assert leak["kind"] == "identical bytes" and {leak["split_a"], leak["split_b"]} == {"train", "test"}
    near = pairs[frozenset((str(planted["original"]), str(planted["resized"])))]
    assert near["kind"] == "thumbnail" and float(near["similarity"]) >= 0.9995
    summary = json.loads((result.folder / "audit.json").read_text())
    assert summary["counts"]["images"] == 3 * 18 + 3 and summary["counts"]["test_images"] == 6
    assert summary["counts"]["leaks_into_test"] >= 1 and summary["settings"]["method"] == "features"
    assert summary["class_counts"] == {"blue": 19, "green": 19, "red": 19}
    assert any("doubtful label" in line for line in lines)
    assert _snapshot(root) == before  # nothing written into, or changed in, the data folder


def test_the_cleaned_manifest_and_the_exclusion_list_feed_back_into_training(audited):
    result, root, planted, _, _, tmp = audited
    manifest = _rows(tmp / "cleaned.csv")
    assert str(planted["mislabelled"]) not in {r["path"] for r in manifest}  # --fix drop (the default)
    assert len(manifest) == 3 * 18 + 3 - len(_rows(result.folder / "label_issues.csv"))
    excluded = {r["path"]: r["reason"] for r in _rows(result.folder / "excluded.csv")}
    assert excluded[str(planted["mislabelled"])].startswith("label issue: given blue, suggested red")
    assert "copy of" in excluded[str(planted["leak"])]  # the training copy of a test image goes

    recipe = load_recipe(None, TINY_OVERRIDES + ["data.layout=csv", f"data.csv={tmp / 'cleaned.csv'}"])
    recipe.data.root = str(root)
    cleaned = prepare_data(recipe, quiet)
    assert len(cleaned.train) + len(cleaned.val) == len(manifest)

    recipe = load_recipe(None, TINY_OVERRIDES + [f"data.exclude={result.folder / 'excluded.csv'}"])
    recipe.data.root = str(root)
    lines: list[str] = []
    kept = prepare_data(recipe, lines.append)
    used = {s.path for s in (*kept.train, *kept.val)}
    assert planted["mislabelled"] not in used and planted["leak"] not in used
    assert len(used) == 3 * 18 + 3 - len(excluded)
    assert {s.path for s in kept.skipped if "data.exclude" in s.reason} == {Path(p) for p in excluded}
    assert any("data.exclude: leaving out" in line for line in lines)


def test_training_warns_when_test_images_are_copies_of_training_images(audited):
    _, root, planted, _, _, tmp = audited
    lines: list[str] = []
    open_training(None, data=root, overrides=TINY_OVERRIDES + [f"output={tmp / 'runs'}"], log=lines.append)
    warning = next(line for line in lines if "byte-identical" in line)
    assert warning.startswith("warning: 1 test image(s)") and "finetune audit" in warning


def test_kfold_audit_trains_folds_then_reuses_the_run_folder(tmp_path, capsys):
    root = tmp_path / "shapes"
    planted = _planted(root)
    overrides = [*TINY_OVERRIDES, f"output={tmp_path / 'runs'}", "name=cv", "train.epochs=2"]
    argv = ["audit", "--data", str(root), "--out", str(tmp_path / "audit"), "--method", "kfold", "--folds", "2",
            *(arg for value in overrides for arg in ("--set", value))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2-fold" in out and "out-of-fold probabilities of 57 images from 2 fold models" in out
    first = _rows(tmp_path / "audit" / "label_issues.csv")
    assert str(planted["mislabelled"]) in {r["path"] for r in first}
    assert main(["audit", str(tmp_path / "runs" / "cv"), "--out", str(tmp_path / "again")]) == 0
    assert "reusing the k-fold run" in capsys.readouterr().out
    assert _rows(tmp_path / "again" / "label_issues.csv") == first  # the same models, the same probabilities


def test_bad_audit_input_is_one_line(tmp_path, capsys, monkeypatch):
    root = write_folder_dataset(tmp_path / "shapes", per_class=4, val_per_class=2, test=0)
    assert main(["audit", "--data", str(root), "--out", str(root / "train" / "audit")]) == 2
    assert "outside the data" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "not a k-fold run folder" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="--method must be one of"):
        AuditOptions(method="magic")
    with pytest.raises(FinetuneError, match="inside the data folder"):
        audit(None, data=root, out=tmp_path / "b", overrides=list(TINY_OVERRIDES), write_manifest=root / "m.csv",
              log=quiet)
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # as if the [audit] extra were not installed
    assert main(["audit", "--data", str(root), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'finetune[audit]'" in err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_audit_page_renders_every_thumbnail_in_headless_chromium(audited):
    result, *_ , tmp = audited
    page = result.page.read_text()
    assert "given: blue" in page and "suggested: red" in page and "leak" in page
    probe = result.folder / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}"]
    try:
        dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=90).stdout
    finally:
        probe.unlink()
    assert 'data-loaded="yes"' in dom
    widths = [int(w) for w in __import__("re").findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == page.count("<img ") >= 7 and min(widths) > 20, widths


def test_a_multilabel_audit_flags_a_dropped_tag_and_writes_label_sets(tmp_path):
    from test_multilabel import write_multilabel_dataset

    root = write_multilabel_dataset(tmp_path / "colours", count=48, test=4)
    rows = list(csv.reader((root / "labels.csv").open()))
    victim = next(i for i, row in enumerate(rows[1:], 1) if len(row[1].split()) == 2)
    rows[victim][1] = rows[victim][1].split()[0]  # one of its two colours left untagged
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    overrides = [*TINY_OVERRIDES, f"output={tmp_path / 'runs'}", "data.task=multilabel", "data.layout=csv",
                 "data.csv=labels.csv", "data.csv_image_dir=images"]
    result = audit(None, data=root, out=tmp_path / "audit", options=AuditOptions(folds=3, fix="relabel"),
                   overrides=overrides, write_manifest=tmp_path / "relabelled.csv", log=quiet)
    judged = _rows(tmp_path / "audit" / "label_quality.csv")
    assert len(judged) == 48 and result.images == 48
    assert all(set(r["given"].split()) <= {"red", "green", "blue"} for r in judged)
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["source"]["task"] == "multilabel" and sum(summary["class_counts"].values()) >= 48
    relabelled = _rows(tmp_path / "relabelled.csv")
    assert len(relabelled) == 48  # --fix relabel keeps every image
    flagged = {r["path"]: r["suggested"] for r in _rows(tmp_path / "audit" / "label_issues.csv")}
    assert all(row["label"] == flagged.get(row["path"], row["label"]) for row in relabelled)
