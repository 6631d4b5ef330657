"""RunDir: the one owner of a run folder — it names every file in it, does every write, and decides who writes.

A run folder is ``<output>/<name>`` (``name-2``, ``name-3``, ... when taken: never overwritten):
recipe.yaml, classes.txt, class_counts.csv, skipped_images.csv, history.csv, curves.png, best.pt,
last.pt, eval/ (an `EvalFiles` bundle), report.html, tensorboard_events/ (train.loggers: [tensorboard]);
a k-fold parent adds cv_summary.json, oof_predictions.csv and one run folder per fold; a tuning study
folder (`StudyDir`) one run folder per trial; a data audit folder (`AuditFiles`) its CSV lists and page.
Only the main process (rank 0 under torchrun) writes; every other process sees the same names and writes nothing.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from finetune.data.images import SkippedImage, is_image_file
from finetune.engine import distributed
from finetune.engine.checkpoint import read_checkpoint, save_checkpoint
from finetune.engine.files import check_writable, replace_atomically, temporary_path
from finetune.errors import FinetuneError
from finetune.outputs.loggers import Logger, create_loggers
from finetune.config.recipe import Recipe
from finetune.outputs.figures.plots import plot_curves

__all__ = ["AuditFiles", "EvalFiles", "RunDir", "StudyDir", "check_output", "refuse_image_folder", "write_skipped_list"]

Log = Callable[[str], None]


def _write_csv(path: Path, rows: Iterable[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches a symlink or hard link to an input
    except OSError:  # one of them does not exist
        return False


def check_output(out: Path, inputs: Iterable[Path], kind: str, earlier: Callable[[Path], bool],
                 force: bool = False) -> bool:
    """Check that a command may write `out`; True when it replaces an earlier output (the caller says so).

    A file the command reads is never written over, not even with `force`; an existing file that
    `earlier` does not recognise as an output of the same kind is replaced only with `force`.
    """
    if out.is_dir():
        raise FinetuneError(f"{out} is a folder; give --out a file name for the {kind}")
    if not out.exists():
        return False
    for source in inputs:
        if _same_file(out, Path(source)):
            raise FinetuneError(f"refusing to write the {kind} to {out}: this command reads that file; "
                                "choose another --out")
    if force or earlier(out):
        return True
    raise FinetuneError(f"{out} exists and is not an earlier {kind} of finetune's (or was changed since); choose "
                        "another --out, or add --force to replace it")


def write_skipped_list(path: Path, skipped: Sequence[SkippedImage], log: Log = print) -> None:
    """List unusable images (path, reason) in `path` and say so, showing the first few."""
    if not distributed.is_main():
        return
    _write_csv(path, [["path", "reason"], *((str(s.path), s.reason) for s in skipped)])
    if skipped:
        log(f"skipped {len(skipped)} unusable image(s), listed in {path}:")
        for item in skipped[:5]:
            log(f"  {item.path}: {item.reason}")
        if len(skipped) > 5:
            log(f"  ... and {len(skipped) - 5} more")


# The figures this toolkit writes: an image by any other name is somebody's data.
_OWN_FIGURES = frozenset({
    "confusion_matrix.png", "most_confused.png", "class_recall.png", "reliability.png", "accuracy_coverage.png",
    "misclassified.png", "gradcam.png", "multilabel_confusion.png", "pr_curves.png", "curves.png", "importance.png",
    "optimization_history.png",
})


def _data_image_in(folder: Path) -> Optional[Path]:
    """An image directly in `folder` that this toolkit did not draw, or None."""
    try:
        return next((p for p in folder.iterdir() if p.name not in _OWN_FIGURES and is_image_file(p)), None)
    except OSError:  # missing or unreadable: nothing there to protect
        return None


def _folders_of_images(parent: Path, skip: str, enough: int) -> list[Path]:
    """Up to `enough` images, each from a different sub-folder of `parent` (other than `skip`) holding images."""
    found: list[Path] = []
    try:
        for folder in parent.iterdir():
            image = _data_image_in(folder) if folder.name != skip and folder.is_dir() else None
            if image is not None:
                found.append(image)
                if len(found) == enough:
                    break
    except OSError:
        pass
    return found


def refuse_image_folder(folder: Path, kind: str) -> None:
    """Refuse to write figures where a data reader would take them for images, even when no data folder is named.

    That is a folder holding images (its PNGs would join them: `score --out` into a test folder gave the next
    `predict` rows named confusion_matrix), a folder inside a class folder (class folders are read
    recursively), or a new folder beside two or more folders of images (it would become a class).
    """
    folder = folder.expanduser().absolute()
    near = _data_image_in(folder)
    inside = _data_image_in(folder.parent)
    if near is None and inside is not None and _folders_of_images(folder.parent.parent, folder.parent.name, 1):
        near = inside  # the parent is a folder of images among others: a class folder
    beside = _folders_of_images(folder.parent, folder.name, 2) if near is None else []
    near = near or (beside[0] if len(beside) == 2 else None)
    if near is not None:
        raise FinetuneError(f"{folder} is in or beside a folder of images ({near}); the {kind} figures would be "
                            "read as images the next time that data is used: give --out a folder outside the data")


class EvalFiles:
    """The evaluation bundle in one folder: the run's eval/, or any --out / score folder."""

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)
        self.confusion_png = self.folder / "confusion_matrix.png"
        self.confusion_csv = self.folder / "confusion_matrix.csv"
        self.most_confused = self.folder / "most_confused.csv"
        self.most_confused_png = self.folder / "most_confused.png"
        self.class_recall_png = self.folder / "class_recall.png"
        self.report_json = self.folder / "classification_report.json"
        self.predictions = self.folder / "predictions.csv"
        self.metrics = self.folder / "metrics.json"
        self.reliability = self.folder / "reliability.png"
        self.coverage_png = self.folder / "accuracy_coverage.png"  # accuracy when only the confident are kept
        self.misclassified = self.folder / "misclassified.png"
        self.gradcam = self.folder / "gradcam.png"
        self.skipped = self.folder / "skipped_images.csv"
        self.score = self.folder / "score.json"
        self.report = self.folder / "report.html"  # the page of an evaluation written outside its run folder
        # data.task multilabel: a 2x2 matrix per class, precision-recall curves, false positives/negatives per
        # label, and the decision thresholds the evaluation used
        self.label_confusion_png = self.folder / "multilabel_confusion.png"
        self.pr_curves_png = self.folder / "pr_curves.png"
        self.label_errors = self.folder / "label_errors.csv"
        self.thresholds = self.folder / "thresholds.csv"

    @property
    def writes(self) -> bool:
        """Whether this process writes the bundle (figures are drawn only when it does)."""
        return distributed.is_main()

    def exists(self) -> bool:
        """True when the folder holds an evaluation (its metrics.json)."""
        return self.metrics.is_file()

    def prepare(self) -> None:
        """Create the folder (main process only); a file in its place is refused, not overwritten."""
        if self.folder.exists() and not self.folder.is_dir():
            raise FinetuneError(f"{self.folder} is a file, not a folder: give --out a new or existing folder for the "
                                "evaluation files")
        refuse_image_folder(self.folder, "evaluation")
        if self.writes:
            check_writable(self.folder, "give --out a folder you can write to")

    def write_csv(self, path: Path, rows: Iterable[Sequence[Any]]) -> None:
        """Write one of the bundle's CSV files."""
        if self.writes:
            _write_csv(path, rows)

    def write_json(self, path: Path, data: Any) -> None:
        """Write one of the bundle's JSON files, indented."""
        if self.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")

    def read_json(self, path: Path) -> Optional[dict]:
        """A JSON file of the bundle, or None when it is missing or unreadable."""
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None


class RunDir:
    """One run folder: `create` a new one (never overwriting) or `open` an existing one (resume, evaluate, report)."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path).expanduser()
        self.recipe = self.path / "recipe.yaml"
        self.classes = self.path / "classes.txt"
        self.class_counts = self.path / "class_counts.csv"
        self.skipped = self.path / "skipped_images.csv"
        self.history = self.path / "history.csv"
        self.curves = self.path / "curves.png"
        self.best = self.path / "best.pt"
        self.last = self.path / "last.pt"
        self.eval = EvalFiles(self.path / "eval")
        self.report = self.path / "report.html"
        self.cv_summary = self.path / "cv_summary.json"
        self.oof_predictions = self.path / "oof_predictions.csv"
        self.submission = self.path / "submission.csv"  # k-fold: the suggested ensemble submission
        self.test_submission = self.path / "predictions" / "submission.csv"  # demo: the test folder's predictions
        self.test_eval = EvalFiles(self.path / "test_eval")  # demo: the submission scored against the answers
        self.tensorboard = self.path / "tensorboard_events"  # train.loggers: [tensorboard]
        self.pseudo_labels = self.path / "pseudo_labels.csv"  # semi: the pseudo-labels this run's model made
        self.semi_summary = self.path / "semi_summary.json"  # semi: parent folder of the rounds
        self.abandoned = self.path / "abandoned.txt"  # tune: why the study gave this interrupted trial up
        self._loggers: list[Logger] = []

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def is_main(self) -> bool:
        """Whether this process writes into the folder."""
        return distributed.is_main()

    @classmethod
    def create(cls, output: Union[str, Path], name: str) -> "RunDir":
        """`output/name`, or `name-2`, `name-3`... so an earlier run is never overwritten.

        Creating claims a new name, so it belongs to the main process: under torchrun rank 0 picks
        and creates it, and every other rank gets that path (all ranks must call this together).
        """
        if distributed.active():
            path = distributed.broadcast_object(cls._claim(output, name) if distributed.is_main() else None)
            return cls(path)
        return cls(cls._claim(output, name))

    @staticmethod
    def _claim(output: Union[str, Path], name: str) -> Path:
        """Create and return the first free folder of `name`, `name-2`, ... in `output`."""
        base = Path(output).expanduser()
        check_writable(base, "set `output` (--set output=DIR) to a folder you can write to")
        candidate, n = base / name, 1
        while True:
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                n += 1
                candidate = base / f"{name}-{n}"

    @classmethod
    def open(cls, path: Union[str, Path]) -> "RunDir":
        """An existing run folder (or the folder of a checkpoint file inside one)."""
        path = Path(path).expanduser()
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise FinetuneError(f"run folder not found: {path}")
        return cls(path)

    def check_writable(self) -> None:
        """Fail at once when this existing folder cannot take new files (a read-only run being resumed)."""
        check_writable(self.path, "make the run folder writable, or copy it somewhere you can write and resume that")

    @classmethod
    def resume_checkpoint(cls, path: Union[str, Path]) -> Path:
        """The checkpoint `--resume PATH` means: the file itself, or a run folder's last.pt."""
        path = Path(path).expanduser()
        if path.is_dir():
            last = cls(path).last
            if not last.is_file():
                raise FinetuneError(
                    f"no {last.name} in {path}: the run did not finish its first epoch, so there is nothing to "
                    "resume; start it again with `finetune train RECIPE`"
                )
            return last
        if not path.is_file():
            raise FinetuneError(f"--resume {path}: no such run folder or checkpoint file")
        return path

    def child(self, name: str) -> "RunDir":
        """A new run folder inside this one (a k-fold fold), never overwriting."""
        return RunDir.create(self.path, name)

    def is_run(self) -> bool:
        """True when the folder holds a run (recipe, evaluation or k-fold summary)."""
        return self.recipe.is_file() or self.eval.exists() or self.cv_summary.is_file()

    def write_recipe(self, recipe: Recipe, note: str = "") -> None:
        """The resolved recipe, to re-run or resume exactly; `note` goes on top as a YAML comment."""
        if self.is_main:
            recipe.to_yaml(self.recipe)
            if note:
                self.recipe.write_text(f"# {note}\n" + self.recipe.read_text())

    def write_data_summary(self, classes: Sequence[str], train_counts: Sequence[int],
                           val_counts: Sequence[int]) -> None:
        """classes.txt and class_counts.csv (images per class in train and val)."""
        if not self.is_main:
            return
        self.classes.write_text("\n".join(classes) + "\n")
        _write_csv(self.class_counts, [["class", "train", "val"],
                                       *(list(row) for row in zip(classes, train_counts, val_counts))])

    def write_skipped(self, skipped: Sequence[SkippedImage], log: Log = print) -> None:
        """skipped_images.csv (written even when empty, so a run says it skipped nothing)."""
        write_skipped_list(self.skipped, skipped, log)

    def save_checkpoint(self, path: Path, payload: dict) -> None:
        """best.pt or last.pt, atomically."""
        if path not in (self.best, self.last):
            raise ValueError(f"{path} is not a checkpoint of {self}")
        if self.is_main:
            save_checkpoint(path, payload)

    def store_decision(self, decision: dict) -> None:
        """Add the task's fitted decision state (temperature / thresholds) to best.pt, atomically."""
        if self.is_main:
            save_checkpoint(self.best, {**read_checkpoint(self.best), **decision})

    def start_loggers(self, recipe: Recipe) -> None:
        """Open the loggers train.loggers names; from now on every history row goes to them too."""
        if self.is_main:
            self._loggers = create_loggers(recipe.train.loggers, recipe, self.path, self.tensorboard)

    def finish_loggers(self, metrics: dict) -> None:
        """Give the loggers the final metrics and figures, then close them."""
        try:
            images = {"confusion_matrix": self.eval.confusion_png, "curves": self.curves}
            for logger in self._loggers:
                logger.finish(metrics, images)
        finally:
            self.close_loggers()

    def close_loggers(self) -> None:
        """Close the loggers (also when training stops with an error, so what was logged is flushed)."""
        loggers, self._loggers = self._loggers, []
        for logger in loggers:
            logger.close()

    def append_history(self, row: dict) -> None:
        """One epoch's row of history.csv (the header comes with the first row), passed on to the loggers."""
        if not self.is_main:
            return
        new = not self.history.exists()
        with self.history.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        for logger in self._loggers:
            logger.log_epoch(row)

    def log_step(self, values: dict) -> None:
        """One optimiser step's loss and rate, for the live loggers only (history.csv holds epochs)."""
        for logger in self._loggers:
            logger.log_step(values)

    def mark_abandoned(self, reason: str) -> None:
        """Say in the folder that its run will not be resumed (its study re-ran it), so listings stop offering it."""
        if self.is_main and self.path.is_dir():
            self.abandoned.write_text(reason + "\n", encoding="utf-8")

    def abandoned_reason(self) -> Optional[str]:
        """Why the run was given up (`mark_abandoned`), or None."""
        try:
            return self.abandoned.read_text(encoding="utf-8").strip() or "abandoned"
        except (OSError, UnicodeDecodeError):
            return None

    def read_history(self) -> list[dict]:
        """history.csv's rows (empty when the run has not finished an epoch)."""
        if not self.history.is_file():
            return []
        with self.history.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def rewrite_history(self, rows: Sequence[dict]) -> None:
        """history.csv holding exactly `rows` (a resumed run drops rows written after its last checkpoint)."""
        if not self.is_main:
            return
        with self.history.open("w", newline="") as handle:
            if rows:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    def plot_curves(self, history: Sequence[dict]) -> None:
        """curves.png: loss, accuracy and learning rate per epoch."""
        if self.is_main:
            plot_curves(list(history), self.curves)

    def write_pseudo_labels(self, rows: Iterable[Sequence[Any]]) -> None:
        """pseudo_labels.csv: path, label, probability (and true label when known) of each image kept."""
        if self.is_main:
            _write_csv(self.pseudo_labels, rows)

    def write_semi_summary(self, summary: dict) -> None:
        """semi_summary.json of a self-training parent folder."""
        if self.is_main:
            self.semi_summary.write_text(json.dumps(summary, indent=2) + "\n")

    def write_cv_summary(self, summary: dict) -> None:
        """cv_summary.json of a k-fold parent folder."""
        if self.is_main:
            self.cv_summary.write_text(json.dumps(summary, indent=2) + "\n")

    def read_cv_summary(self) -> Optional[dict]:
        """The k-fold summary, when this is a k-fold parent folder."""
        return self.eval.read_json(self.cv_summary)

    def write_oof_predictions(self, fold_predictions: Sequence[Path]) -> None:
        """Every image's out-of-fold prediction in one CSV (for stacking or error analysis)."""
        if not self.is_main:
            return
        with self.oof_predictions.open("w", newline="") as handle:
            writer = None
            for fold, path in enumerate(fold_predictions, 1):
                with path.open(newline="", encoding="utf-8-sig") as source:
                    for row in csv.DictReader(source):
                        if writer is None:
                            writer = csv.DictWriter(handle, fieldnames=["fold", *row])
                            writer.writeheader()
                        writer.writerow({"fold": fold, **row})

    def write_report(self, page: str, evaluation: Optional[EvalFiles] = None) -> Path:
        """Write a rendered report page; returns its path.

        The run's own eval/ belongs on the run's page (report.html); an evaluation written
        elsewhere gets its own page in its folder.
        """
        evaluation = evaluation or self.eval
        own = evaluation.folder.resolve() == self.eval.folder.resolve()
        if not own:
            refuse_image_folder(evaluation.folder, "report")
        out = self.report if own else evaluation.report
        if self.is_main:
            check_writable(out.parent, "make that folder writable, or copy the run somewhere you can write")
            out.write_text(page, encoding="utf-8")
        return out


class StudyDir:
    """A tuning study folder (`finetune tune`): one run folder per trial, plus the study's own files.

    study.db is Optuna's SQLite storage (what `--resume` continues); study_recipe.yaml and space.yaml
    are what the study searches from and over; trials.csv, best_recipe.yaml, importance.png and
    optimization_history.png are (re)written at the end of each session.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path).expanduser()
        self.storage = self.path / "study.db"
        self.base_recipe = self.path / "study_recipe.yaml"  # not recipe.yaml: the study folder is not a run
        self.space = self.path / "space.yaml"
        self.trials = self.path / "trials.csv"
        self.best_recipe = self.path / "best_recipe.yaml"
        self.importance = self.path / "importance.png"
        self.history = self.path / "optimization_history.png"

    def __repr__(self) -> str:
        return f"StudyDir({str(self.path)!r})"

    @property
    def storage_url(self) -> str:
        """The SQLAlchemy URL Optuna opens."""
        return f"sqlite:///{self.storage.resolve()}"

    @classmethod
    def create(cls, output: Union[str, Path], name: str) -> "StudyDir":
        """A new study folder `output/name` (suffixed -2, -3... like a run folder)."""
        return cls(RunDir.create(output, name).path)

    @classmethod
    def open(cls, path: Union[str, Path]) -> "StudyDir":
        """An existing study folder, to resume."""
        study = cls(path)
        if not study.storage.is_file():
            raise FinetuneError(f"{study.path} is not a study folder (no {study.storage.name}); pass the folder "
                                "`finetune tune` created")
        return study

    def trial_name(self, number: int) -> str:
        """The run folder name of trial `number`."""
        return f"trial{number:03d}"

    def trial_run(self, number: int) -> RunDir:
        """The run folder of trial `number`."""
        return RunDir(self.path / self.trial_name(number))

    def write_text(self, path: Path, text: str) -> None:
        """One of the study's text files (recipes, space)."""
        if path.parent != self.path:
            raise ValueError(f"{path} is not a file of {self}")
        if distributed.is_main():
            path.write_text(text, encoding="utf-8")

    def write_recipe(self, path: Path, recipe: Recipe) -> None:
        """study_recipe.yaml or best_recipe.yaml."""
        if path not in (self.base_recipe, self.best_recipe):
            raise ValueError(f"{path} is not a recipe of {self}")
        if distributed.is_main():
            recipe.to_yaml(path)

    def write_trials(self, rows: Sequence[Sequence[Any]]) -> None:
        """trials.csv: header first."""
        if distributed.is_main():
            _write_csv(self.trials, rows)

    def write_png(self, path: Path, data: bytes) -> None:
        """importance.png or optimization_history.png."""
        if path not in (self.importance, self.history):
            raise ValueError(f"{path} is not a figure of {self}")
        if distributed.is_main():
            path.write_bytes(data)


class AuditFiles:
    """A data audit folder (`finetune audit --out`): the flagged images' lists, the summary and the page.

    label_issues.csv (path, given, suggested, quality; worst first), label_quality.csv (the same for every labelled
    image: the full ranking, the top-loss view), duplicates.csv (path_a, path_b, split_a,
    split_b, similarity), outliers.csv (path, score), excluded.csv (path, reason: what `data.exclude` reads, for
    the user to edit), audit.json (counts and settings) and audit.html. The manifest of `--write-manifest` goes
    where the user names it. The user's data folder is never written.
    """

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder).expanduser()
        self.label_issues = self.folder / "label_issues.csv"
        self.label_quality = self.folder / "label_quality.csv"
        self.duplicates = self.folder / "duplicates.csv"
        self.outliers = self.folder / "outliers.csv"
        self.excluded = self.folder / "excluded.csv"
        self.summary = self.folder / "audit.json"
        self.page = self.folder / "audit.html"
        self.skipped = self.folder / "skipped_images.csv"

    def prepare(self) -> None:
        """Create the folder (main process only); refuse a file in its place or a folder among the images."""
        if self.folder.exists() and not self.folder.is_dir():
            raise FinetuneError(f"{self.folder} is a file, not a folder: give --out a folder for the audit")
        refuse_image_folder(self.folder, "audit")
        if distributed.is_main():
            check_writable(self.folder, "give --out a folder you can write to")

    def write_csv(self, path: Path, rows: Iterable[Sequence[Any]]) -> None:
        """One of the audit's CSV lists, header first."""
        if path.parent != self.folder:
            raise ValueError(f"{path} is not a file of {self.folder}")
        if distributed.is_main():
            _write_csv(path, rows)

    def write_manifest(self, path: Path, rows: Iterable[Sequence[Any]]) -> None:
        """The cleaned CSV manifest (`--write-manifest`), anywhere but inside the audited data (checked by the
        caller); written whole or not at all."""
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(path)
            _write_csv(tmp, rows)
            replace_atomically(tmp, path)

    def write_summary(self, summary: dict) -> None:
        """audit.json."""
        if distributed.is_main():
            self.summary.write_text(json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> Optional[dict]:
        """audit.json, or None."""
        try:
            return json.loads(self.summary.read_text()) if self.summary.is_file() else None
        except (OSError, ValueError):
            return None

    def write_page(self, page: str) -> Path:
        """audit.html."""
        if distributed.is_main():
            self.page.write_text(page, encoding="utf-8")
        return self.page
