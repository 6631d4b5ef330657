"""Every command is torchrun-aware: `lr-find`, `tune` and the `semi:` rounds under 2 gloo processes give what one
process gives, and one process writes. (train, evaluate, predict, k-fold and pseudo-label: test_distributed.py
and test_composition.py.)"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import QUICK_CPU, write_folder_dataset
from test_composition import BASE, TASK_SETTINGS
from test_distributed import _finetune, _sets
from test_multilabel import write_multilabel_dataset

from finetune.workflows.preview import lr_find
from finetune.workflows.semi import train_semi

SEMI = ["semi.rounds=1", "semi.threshold=0.6", "semi.max_per_class=4", "train.epochs=1"]


def test_lr_find_under_two_processes_suggests_what_one_does_and_plots_once(tmp_path, one_torch_thread):
    data = write_folder_dataset(tmp_path / "data", per_class=8, val_per_class=2, test=0)
    settings = BASE + ["data.batch_size=8"]
    one = lr_find(QUICK_CPU, data=data, overrides=settings, out=tmp_path / "one.png", steps=6, log=lambda line: None)
    done = _finetune("lr-find", QUICK_CPU, "--data", str(data), "--out", str(tmp_path / "two.png"), "--steps", "6",
                     *_sets(settings))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.findall(r"suggested learning rate: (\S+) ", done.stdout)
    assert printed == [f"{one.suggestion:.1e}"]  # printed once (rank 0), the same value
    assert (tmp_path / "two.png").is_file()


@pytest.mark.parametrize("task", list(TASK_SETTINGS))
def test_semi_rounds_under_two_processes_match_one(task, tmp_path, one_torch_thread):
    if task == "single":
        data = write_folder_dataset(tmp_path / "data", per_class=8, val_per_class=3, test=12)
    else:
        data = write_multilabel_dataset(tmp_path / "data", count=32, test=12)
    settings = BASE + TASK_SETTINGS[task] + SEMI + [f"semi.unlabeled={data / 'test'}"]
    one = train_semi(QUICK_CPU, data=data, overrides=settings + ["data.batch_size=16", f"output={tmp_path / 'one'}",
                                                                  "name=semi"], log=lambda line: None).summary
    done = _finetune("train", QUICK_CPU, "--data", str(data),
                     *_sets(settings + ["data.batch_size=8", f"output={tmp_path / 'two'}", "name=semi"]))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "semi" / "semi_summary.json").read_text())
    assert one["metric"] == two["metric"]
    for a, b in zip(one["rounds"], two["rounds"]):
        assert a["pseudo_labels"] == b["pseudo_labels"] and a["train_images"] == b["train_images"]
        assert a["val_score"] == pytest.approx(b["val_score"], abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["semi"]  # one parent folder, not one per rank
    labelled = [[row[:2] for row in csv.reader((Path(s["rounds"][0]["run_dir"]) / "pseudo_labels.csv").open())]
                for s in (one, two)]
    assert labelled[0] == labelled[1]  # the same images with the same labels


def test_tune_under_two_processes_trains_each_trial_on_both_and_matches_one(tmp_path, one_torch_thread):
    import yaml

    from finetune.workflows.tune import TrialBudget, tune

    data = write_folder_dataset(tmp_path / "data", per_class=8, val_per_class=3, test=0)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"log_uniform": [1.0e-3, 1.0e-1]}}))
    settings = BASE + ["train.epochs=1", "name=study"]
    one = tune(QUICK_CPU, space=space, budget=TrialBudget(2), data=data, log=lambda line: None,
               overrides=settings + ["data.batch_size=16", f"output={tmp_path / 'one'}"])
    done = _finetune("tune", QUICK_CPU, "--space", str(space), "--trials", "2", "--data", str(data),
                     *_sets(settings + ["data.batch_size=8", f"output={tmp_path / 'two'}"]))
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two" / "study-tune"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["study-tune"]  # one study folder
    assert sorted(p.name for p in two.glob("trial[0-9]*")) == ["trial000", "trial001"]  # each trial once, shared
    rows = [list(csv.DictReader((folder / "trials.csv").open())) for folder in (one.study_dir, two)]
    assert [r["train.lr"] for r in rows[0]] == [r["train.lr"] for r in rows[1]]  # the same draws
    assert [float(r["value"]) for r in rows[0]] == pytest.approx([float(r["value"]) for r in rows[1]], abs=1e-4)
    assert done.stdout.count("trial 0:") == 1  # the main process alone logs
