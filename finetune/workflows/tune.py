"""`finetune tune`: hyper-parameter search with Optuna over recipe keys; every trial is an ordinary run folder.

TPE proposes values, a median pruner stops trials whose per-epoch validation metric trails the
others', and the study lives in SQLite inside the study folder, so an interrupted study resumes
where it stopped. The end: best_recipe.yaml, trials.csv, importance and history figures, and the
command that trains the best recipe.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from finetune.workflows.api import train
from finetune.errors import FinetuneError
from finetune.workflows.kfold import train_kfold
from finetune.engine import distributed
from finetune.workflows.opening import open_training
from finetune.config.recipe import Recipe, load_recipe, lower_is_better, resolve_recipe
from finetune.outputs.figures.tuning_plots import plot_history, plot_importance
from finetune.outputs.run_dir import RunDir, StudyDir
from finetune.workflows.runs_table import read_run

__all__ = ["TuneResult", "TrialBudget", "SPACE_KINDS", "load_space", "tune"]

Log = Callable[[str], None]

# How a recipe key is searched: {log_uniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]}, {choice: [a, b, ...]}
SPACE_KINDS = ("log_uniform", "uniform", "int", "choice")
_SCALARS = (type(None), bool, int, float, str)


@dataclass
class TuneResult:
    """The study folder, its best trial and the command that trains the best recipe."""

    study_dir: Path
    best_value: Optional[float]
    best_params: dict[str, Any]
    best_recipe: Optional[Path]
    best_run: Optional[Path]
    command: Optional[str]
    finished_trials: int


def _check_dimension(key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise FinetuneError(f"search space key '{key}' must be one of {{log_uniform: [lo, hi]}}, "
                            f"{{uniform: [lo, hi]}}, {{int: [lo, hi]}} or {{choice: [a, b, ...]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise FinetuneError(f"search space key '{key}': {kind} needs a list, e.g. {kind}: [1, 4]")
    if kind == "choice":
        return
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
            or not values[0] < values[1]:
        raise FinetuneError(f"search space key '{key}': {kind} needs [low, high] numbers with low < high, got {values}")
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise FinetuneError(f"search space key '{key}': int needs whole-number bounds, got {values}")
    if kind == "log_uniform" and values[0] <= 0:
        raise FinetuneError(f"search space key '{key}': log_uniform needs positive bounds, got {values}")


def load_space(space: Union[str, Path, dict], recipe: Recipe) -> dict[str, dict]:
    """Read and check a search space: recipe keys mapped to how each is searched."""
    if not isinstance(space, dict):
        path = Path(space).expanduser()
        if not path.is_file():
            raise FinetuneError(f"search space file not found: {path}")
        try:
            space = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise FinetuneError(f"search space {path} is not valid YAML: {err}") from None
    if not isinstance(space, dict) or not space:
        raise FinetuneError("the search space must map recipe keys to ranges, "
                            "e.g. train.lr: {log_uniform: [1e-4, 1e-2]}")
    for key, spec in space.items():
        _check_dimension(key, spec)
        kind, values = next(iter(spec.items()))
        for value in (values if kind == "choice" else values[:2]):
            recipe.derive(settings={key: value})  # every end of the range must make a valid recipe
    return space


def _suggest(trial, key: str, spec: dict) -> Any:
    kind, values = next(iter(spec.items()))
    if kind == "log_uniform":
        return trial.suggest_float(key, float(values[0]), float(values[1]), log=True)
    if kind == "uniform":
        return trial.suggest_float(key, float(values[0]), float(values[1]))
    if kind == "int":
        return trial.suggest_int(key, values[0], values[1])
    if all(isinstance(v, _SCALARS) for v in values):
        return trial.suggest_categorical(key, values)
    # Optuna's choices are scalars; a list-valued setting (head.hidden) is chosen by its JSON text.
    return json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in values]))


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise FinetuneError("finetune tune needs Optuna: pip install 'finetune[tune]'") from None
    return optuna


def _better(metric: str, folds: Optional[int]) -> bool:
    """True when a higher objective is better (accuracy; cross-validation scores accuracy too)."""
    return folds is not None or not lower_is_better(metric)


def _objective(optuna, study: StudyDir, recipe: Recipe, space: dict, dataset, folds: Optional[int], log: Log):
    metric = recipe.train.monitor
    maximize = _better(metric, folds)

    def objective(trial) -> float:
        params = {key: _suggest(trial, key, spec) for key, spec in space.items()}
        trial_recipe = recipe.derive(name=study.trial_name(trial.number), output=str(study.path), settings=params)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        log(f"trial {trial.number}: {shown}")
        distributed.broadcast_object(("trial", trial_recipe))  # the other processes train it with this one
        prefixed = (lambda line: log(f"[trial {trial.number}] {line}"))
        if folds is not None:
            result = train_kfold(trial_recipe, folds, log=prefixed, prepared=dataset)
            trial.set_user_attr("run_dir", str(result.run_dir))
            return result.mean
        values: list[float] = []
        pruned = []

        def on_epoch(row: dict) -> bool:
            values.append(float(row[metric]))
            trial.report(values[-1], int(row["epoch"]))
            if trial.should_prune():
                pruned.append(int(row["epoch"]))
                return True
            return False

        result = train(trial_recipe, log=prefixed, prepared=dataset, on_epoch=on_epoch)
        trial.set_user_attr("run_dir", str(result.run_dir))
        if pruned:
            log(f"trial {trial.number} pruned after epoch {pruned[0]}: {metric} {values[-1]:.4f} trails the median "
                "of earlier trials at that epoch")
            raise optuna.TrialPruned()
        return max(values) if maximize else min(values)

    return objective


def _recover_interrupted(study, folder: StudyDir, log: Log) -> None:
    """Trials left running by an interrupted session fail now, and their parameters are queued to run again.

    The interrupted trial's run folder is marked abandoned: the study never resumes it, so `finetune runs`
    must not offer it as "interrupted (resumable)".
    """
    from optuna.trial import TrialState

    retried = set(study.user_attrs.get("retried", []))
    for trial in study.get_trials(deepcopy=False):
        interrupted = trial.state == TrialState.RUNNING or (trial.state == TrialState.FAIL
                                                            and trial.user_attrs.get("interrupted"))
        if not interrupted or trial.number in retried:
            continue
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        reason = "abandoned: interrupted, and its study does not resume trials"
        if trial.params:
            study.enqueue_trial(trial.params)  # the failed trial itself has them: no skip_if_exists
            rerun = study.get_trials(deepcopy=False)[-1].number  # enqueueing stores the waiting trial now
            reason = f"abandoned: interrupted, its parameters re-run as trial {rerun}"
        folder.trial_run(trial.number).mark_abandoned(reason)
        retried.add(trial.number)
        log(f"trial {trial.number} was interrupted; its parameters are queued to run again")
    study.set_user_attr("retried", sorted(retried))


def _trials_table(optuna, study, space: dict, root: Path) -> list[list[Any]]:
    header = ["trial", "state", "value", *space, "run", "best epoch", "epochs", "status"]
    rows: list[list[Any]] = [header]
    for trial in study.get_trials(deepcopy=False):
        run_dir = trial.user_attrs.get("run_dir")
        run = RunDir(run_dir) if run_dir else None
        values = [trial.number, trial.state.name.lower(), "" if trial.value is None else trial.value,
                  *(trial.params.get(k, "") for k in space)]
        if run is not None and run.cv_summary.is_file():  # --folds: a k-fold parent, its folds are the runs
            rows.append([*values, run.path.name, "", "", "cross-validated"])
        elif run is not None and run.recipe.is_file():
            info = read_run(run, root)
            rows.append([*values, info.name, info.best_epoch, info.epochs_done, info.status])
        else:
            rows.append([*values, "", "", "", ""])
    return rows


def _figures(optuna, study, folder: StudyDir, metric: str, maximize: bool, log: Log) -> None:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        folder.write_png(folder.history, plot_history([t.number for t in complete], [t.value for t in complete],
                                                      metric, maximize))
    if len(complete) < 2:
        log(f"parameter importance needs at least 2 finished (not pruned) trials; {folder.importance.name} not written")
        return
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as err:  # e.g. every finished trial had the same value
        log(f"parameter importance not computed: {err}")
        return
    folder.write_png(folder.importance, plot_importance(importances))


def _finish(optuna, study, folder: StudyDir, recipe: Recipe, space: dict, folds: Optional[int], log: Log) -> TuneResult:
    from optuna.trial import TrialState

    metric = "cv accuracy" if folds is not None else recipe.train.monitor
    maximize = _better(recipe.train.monitor, folds)
    folder.write_trials(_trials_table(optuna, study, space, folder.path))
    _figures(optuna, study, folder, metric, maximize, log)
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log(f"no trial finished unpruned yet; trials in {folder.trials}")
        return TuneResult(folder.path, None, {}, None, None, None, finished)
    best = study.best_trial
    best_recipe = recipe.derive(name=f"{recipe.name}-best", settings=best.params)
    folder.write_recipe(folder.best_recipe, best_recipe)
    command = f"finetune train {shlex.quote(str(folder.best_recipe))}" + (f" --folds {folds}" if folds else "")
    log(f"best: trial {best.number}, {metric} {best.value:.4f} with "
        + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    log(f"trials table {folder.trials}; best recipe {folder.best_recipe}")
    log(f"train the best recipe with:\n  {command}")
    run = best.user_attrs.get("run_dir")
    return TuneResult(folder.path, float(best.value), dict(best.params), folder.best_recipe,
                      Path(run) if run else None, command, finished)


@dataclass(frozen=True)
class TrialBudget:
    """How many trials a study runs, and how many of them run in full before pruning starts.

    Attributes:
        trials: finished trials the study should have.
        startup_trials: trials run in full before the median pruner may stop one.
    """

    trials: int = 20
    startup_trials: int = 3


def _open_study(optuna, recipe: Union[Recipe, str, Path, None], space: Union[str, Path, dict, None],
                data: Optional[Union[str, Path]], overrides: Optional[list[str]], folds: Optional[int],
                resume: Optional[Union[str, Path]]) -> tuple[Recipe, dict, Optional[StudyDir], Optional[int]]:
    """(base recipe, checked search space, the study folder when resuming, folds): a resumed study keeps its own."""
    if resume is None:
        if space is None:
            raise FinetuneError("give the search space: --space SPACE.yaml (recipe keys mapped to ranges, e.g. "
                                "train.lr: {log_uniform: [1e-4, 1e-2]})")
        base = resolve_recipe(recipe, overrides, data)
        return base, load_space(space, base), None, folds
    folder = StudyDir.open(resume)
    base = load_recipe(folder.base_recipe, overrides)
    if data is not None:
        base.data.root = str(Path(data).expanduser().resolve())
    searched = load_space(space if space is not None else folder.space, base)
    previous = _load(folder, optuna)
    stored = previous.user_attrs.get("folds") if previous is not None else None
    if folds is not None and folds != stored:
        raise FinetuneError(f"the study was scored with --folds {stored}; resume it with the same setting")
    return base, searched, folder, stored


def _create_study(optuna, folder: StudyDir, base: Recipe, maximize: bool, startup_trials: int):
    """The study in the folder's SQLite storage (loaded if it is there), with the TPE sampler and median pruner."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # finetune logs each trial itself
    return optuna.create_study(
        study_name="finetune", storage=folder.storage_url, load_if_exists=True,
        direction="maximize" if maximize else "minimize",
        # A resumed session seeds past the trials already drawn, so it does not replay their values.
        sampler=optuna.samplers.TPESampler(seed=base.train.seed + _trial_count(folder, optuna)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0),
    )


def _follow_trials(dataset, folds: Optional[int], log: Log) -> TuneResult:
    """Under torchrun, every process but the main one: train each trial the main process draws, with it (DDP, or
    folds side by side), until it sends the study's result. Optuna and its storage are the main process's alone."""
    while True:
        kind, value = distributed.broadcast_object(None)
        if kind == "done":
            return value
        try:
            if folds is not None:
                train_kfold(value, folds, log=log, prepared=dataset)
            else:  # the main process's pruning decision reaches this run through fit's stop broadcast
                train(value, log=log, prepared=dataset)
        except FinetuneError:
            pass  # the main process met the same error: the study records the trial as failed and goes on


def _run_trials(study, objective: Callable, remaining: int, folder: StudyDir, trials: int, log: Log) -> None:
    """Run the remaining trials; an interrupted trial is marked so that resuming runs its parameters again."""

    def guarded(trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # resume runs these parameters again
            raise

    if remaining > 0:
        try:
            # A trial whose values make no valid run (FinetuneError) fails alone; the study goes on.
            study.optimize(guarded, n_trials=remaining, catch=(FinetuneError,))
        except KeyboardInterrupt:
            log(f"interrupted; continue with: finetune tune --resume {shlex.quote(str(folder.path))} "
                f"--trials {trials}")
            raise


def tune(
    recipe: Union[Recipe, str, Path, None] = None,
    space: Union[str, Path, dict, None] = None,
    budget: Optional[TrialBudget] = None,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    folds: Optional[int] = None,
    resume: Optional[Union[str, Path]] = None,
    log: Log = print,
) -> TuneResult:
    """Search `space` (recipe keys → ranges) over `budget.trials` trials for the recipe with the best validation metric.

    The study folder is `<output>/<name>-tune`; `resume` (a study folder) continues one until it has
    `budget.trials` finished trials, never repeating those done. `folds` scores each trial by k-fold
    cross-validation accuracy instead of the validation split (no pruning then). The median pruner
    starts pruning once `budget.startup_trials` trials have finished.

    Args:
        recipe: a YAML path, or the name of a shipped recipe (`finetune recipes` lists them); not needed with
            resume.
        space: a YAML file of recipe keys and their ranges, e.g. train.lr: {log_uniform: [1e-4, 1e-2]},
            augment.preset: {choice: [light, medium]}, model.trainable_last: {int: [1, 4]}.
        budget: how many trials, and how many run before pruning starts (TrialBudget).
        data: dataset folder (overrides data.root).
        overrides: override a recipe value, e.g. train.epochs=5 (repeatable).
        folds: score each trial by K-fold cross-validation accuracy instead of the validation split.
        resume: continue an interrupted study folder (its saved recipe, space and finished trials).
        log: where progress lines go.
    """
    if recipe is None and resume is None:
        raise FinetuneError("give a recipe to tune and --space SPACE.yaml, or --resume STUDY_DIR to continue a study")
    budget = budget or TrialBudget()
    optuna = _import_optuna()
    if budget.trials < 1:
        raise FinetuneError(f"--trials must be at least 1, got {budget.trials}")
    base, searched, folder, folds = _open_study(optuna, recipe, space, data, overrides, folds, resume)
    # Under torchrun every trial trains on all processes (DDP; with folds, folds side by side).
    opening = open_training(base, log=log)
    dataset = opening.dataset  # scanned once; every trial trains on the same split
    log(dataset.describe())
    if folder is None:
        folder = StudyDir.create(base.output, f"{base.name}-tune")
        folder.write_recipe(folder.base_recipe, base)
        folder.write_text(folder.space, yaml.safe_dump(searched, sort_keys=False))
    if not distributed.is_main():
        return _follow_trials(dataset, folds, log)
    result = None
    try:
        result = _search(optuna, base, searched, folder, dataset, folds, resume is not None, budget, log)
    finally:  # the other processes stop following, with the result (None after an error here)
        distributed.broadcast_object(("done", result))
    return result


def _search(optuna, base: Recipe, searched: dict, folder: StudyDir, dataset, folds: Optional[int], resumed: bool,
            budget: TrialBudget, log: Log) -> TuneResult:
    """The main process's part: the Optuna study over the remaining trials, then the best recipe and figures."""
    maximize = _better(base.train.monitor, folds)
    study = _create_study(optuna, folder, base, maximize, budget.startup_trials)
    if resumed:
        _recover_interrupted(study, folder, log)
    else:
        study.set_user_attr("folds", folds)
    from optuna.trial import TrialState

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = budget.trials - done
    log(f"study {folder.path}: {done} trial(s) finished, {max(remaining, 0)} to run "
        f"({'maximise' if maximize else 'minimise'} {'cv accuracy' if folds else base.train.monitor})")
    objective = _objective(optuna, folder, base, searched, dataset, folds, log)
    _run_trials(study, objective, remaining, folder, budget.trials, log)
    return _finish(optuna, study, folder, base, searched, folds, log)


def _load(folder: StudyDir, optuna):
    """The study a folder already holds, or None."""
    if not folder.storage.is_file():
        return None
    try:
        return optuna.load_study(study_name="finetune", storage=folder.storage_url)
    except KeyError:
        return None


def _trial_count(folder: StudyDir, optuna) -> int:
    study = _load(folder, optuna)
    return len(study.get_trials(deepcopy=False)) if study is not None else 0
