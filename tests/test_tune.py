"""`finetune tune`: a tiny study prunes, resumes after an interruption without repeating trials, and its best
recipe loads and trains."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("optuna")

import finetune.workflows.tune as tune_module  # noqa: E402
from finetune.workflows.api import train  # noqa: E402
from finetune.cli import main  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402
from finetune.config.recipe import Recipe, load_recipe  # noqa: E402
from finetune.outputs.run_dir import RunDir, StudyDir  # noqa: E402
from finetune.workflows.tune import TrialBudget, load_space, tune  # noqa: E402
from tests.conftest import QUICK_CPU  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# From "barely moves" to "learns the colours in an epoch": the slow trials trail the median and are pruned.
SPACE = {"train.lr": {"log_uniform": [1e-6, 0.05]}, "augment.preset": {"choice": ["none", "light"]}}


def _quiet(_: str) -> None:
    pass


def test_the_space_is_checked_against_the_recipe() -> None:
    recipe = Recipe()
    assert load_space(SPACE, recipe) == SPACE
    with pytest.raises(FinetuneError, match="unknown recipe key 'train.learning_rate'"):
        load_space({"train.learning_rate": {"uniform": [0.1, 0.2]}}, recipe)
    with pytest.raises(FinetuneError, match="low < high"):
        load_space({"train.lr": {"log_uniform": [0.1, 0.01]}}, recipe)
    with pytest.raises(FinetuneError, match="valid choices"):
        load_space({"augment.preset": {"choice": ["light", "extreme"]}}, recipe)
    with pytest.raises(FinetuneError, match="one of"):
        load_space({"train.lr": [0.1, 0.2]}, recipe)


def test_a_study_prunes_resumes_without_repeating_trials_and_its_best_recipe_trains(
        folder_dataset: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    import optuna
    from optuna.trial import TrialState

    overrides = tiny_overrides + ["train.epochs=3", "train.warmup_epochs=0"]
    first = tune(QUICK_CPU, space=SPACE, budget=TrialBudget(4, startup_trials=1), data=folder_dataset,
                 overrides=overrides, log=_quiet)
    study_dir = StudyDir(first.study_dir)
    assert first.finished_trials == 4 and study_dir.storage.is_file()
    finished_runs = {p.name: p.joinpath("history.csv").stat().st_mtime_ns for p in study_dir.path.glob("trial[0-9]*")}
    assert len(finished_runs) == 4

    # Interrupt the next session in the middle of its first trial's second epoch.
    calls: list[str] = []

    def interrupted_train(recipe, **kwargs):
        calls.append(recipe.name)
        hook = kwargs["on_epoch"]

        def crash(row: dict) -> bool:
            if int(row["epoch"]) == 2:
                raise KeyboardInterrupt
            return hook(row)

        return train(recipe, **{**kwargs, "on_epoch": crash})

    monkeypatch.setattr(tune_module, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        tune(resume=study_dir.path, budget=TrialBudget(6), log=_quiet)
    assert calls == ["trial004"]

    # Resume: only the two missing trials run — the interrupted parameters first — and no finished one again.
    def counted_train(recipe, **kwargs):
        calls.append(recipe.name)
        return train(recipe, **kwargs)

    monkeypatch.setattr(tune_module, "train", counted_train)
    lines: list[str] = []
    result = tune(resume=study_dir.path, budget=TrialBudget(6), log=lines.append)
    assert calls == ["trial004", "trial005", "trial006"]
    assert any("trial 4 was interrupted" in line for line in lines)
    # `finetune runs` no longer offers the interrupted trial as resumable: the study re-ran it as trial 5.
    assert main(["runs", str(study_dir.path)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial004")]
    assert "abandoned: interrupted, its parameters re-run as trial 5" in row and "resumable" not in row
    assert {p.name: p.joinpath("history.csv").stat().st_mtime_ns for p in study_dir.path.glob("trial[0-9]*")
            if p.name in finished_runs} == finished_runs

    study = optuna.load_study(study_name="finetune", storage=study_dir.storage_url)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 6 == result.finished_trials
    assert TrialState.PRUNED in states  # the median pruner stopped at least one slow trial
    retried = study.get_trials()[4].params
    assert study.get_trials()[5].params == retried  # the interrupted trial's values ran again

    # The trials table: one line per trial, pruned ones marked, each with its run folder.
    rows = list(csv.DictReader(study_dir.trials.open()))
    assert [int(r["trial"]) for r in rows] == list(range(7))
    assert "pruned" in {r["state"] for r in rows} and rows[0]["run"] == "trial000"
    assert study_dir.history.is_file()
    assert states.count(TrialState.COMPLETE) >= 2 and study_dir.importance.is_file()

    # The best recipe is the best trial's values on the study's recipe, and it trains as it is.
    best = load_recipe(result.best_recipe)
    assert best.train.lr == pytest.approx(result.best_params["train.lr"])
    assert best.augment.preset == result.best_params["augment.preset"]
    assert result.best_value == study.best_value
    assert result.command == f"finetune train {result.best_recipe}"
    trained = train(result.best_recipe, overrides=["train.epochs=1", f"output={tmp_path / 'best'}"], log=_quiet)
    assert trained.best_epoch == 1


def test_tune_from_the_command_line_needs_a_space(folder_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", QUICK_CPU, "--data", str(folder_dataset)]) == 2
    assert "--space SPACE.yaml" in capsys.readouterr().err


def test_folds_score_each_trial_by_cross_validation(folder_dataset: Path, tiny_overrides: list[str]) -> None:
    overrides = tiny_overrides + ["train.epochs=1", "train.warmup_epochs=0"]
    result = tune(QUICK_CPU, space={"train.lr": {"choice": [0.01]}}, budget=TrialBudget(1), data=folder_dataset,
                  overrides=overrides, folds=2, log=_quiet)
    trial = result.study_dir / "trial000"
    summary = RunDir(trial).read_cv_summary()
    assert summary is not None and len(summary["folds"]) == 2
    assert result.best_value == pytest.approx(summary["mean"])
    rows = list(csv.DictReader(StudyDir(result.study_dir).trials.open()))
    assert rows[0]["status"] == "cross-validated"
    with pytest.raises(FinetuneError, match="--folds 2"):
        tune(resume=result.study_dir, budget=TrialBudget(2), folds=3, log=_quiet)
