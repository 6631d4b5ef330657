"""Resume after a crash: kill -9 mid-epoch, Ctrl-C, and an exact continuation of the same run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_OVERRIDES, write_folder_dataset
from finetune import FinetuneError, load_model, train
from finetune.cli import main
from finetune.config.recipe import apply_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ["train.ema=true", "train.accumulate=2", "augment.mixup=0.2", "augment.cutmix=1.0", "augment.preset=heavy"]


def epochs_in(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in csv.DictReader((run_dir / "history.csv").open())]


def without_seconds(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((run_dir / "history.csv").open())]


def test_resumed_run_continues_exactly_as_if_never_stopped(folder_dataset, tmp_path, capsys):
    overrides = TINY_OVERRIDES + EXTRAS + ["train.epochs=3"]
    whole = train(None, data=folder_dataset, overrides=overrides + [f"output={tmp_path / 'whole'}"], log=lambda _: None)

    def stop_after_epoch_2(message: str) -> None:
        if message.startswith("epoch 2/3"):
            raise KeyboardInterrupt  # as Ctrl-C would, right after epoch 2 was saved

    with pytest.raises(KeyboardInterrupt):
        train(None, data=folder_dataset, overrides=overrides + [f"output={tmp_path / 'cut'}"], log=stop_after_epoch_2)
    cut_dir = tmp_path / "cut" / "run"
    assert epochs_in(cut_dir) == [1, 2]
    resumed = train(resume=cut_dir, log=print)
    assert resumed.run_dir == cut_dir
    assert "resuming" in capsys.readouterr().out
    # Model, optimiser, schedule, EMA and every random stream (shuffle, augmentation, mixing) restored.
    assert without_seconds(cut_dir) == without_seconds(whole.run_dir)
    final_cut = torch.load(cut_dir / "last.pt", weights_only=True)["model_state"]
    final_whole = torch.load(whole.run_dir / "last.pt", weights_only=True)["model_state"]
    assert all(torch.equal(final_cut[k], final_whole[k]) for k in final_whole)

    with pytest.raises(FinetuneError, match="already finished: 3 of 3 epoch"):
        train(resume=cut_dir, log=lambda _: None)
    with pytest.raises(FinetuneError, match="holds no training state"):
        train(resume=cut_dir / "best.pt", log=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no last.pt"):
        train(resume=tmp_path / "empty", log=lambda _: None)


def start_training(tmp_path: Path, epochs: int, workers: int = 0) -> tuple[subprocess.Popen, Path, Path]:
    """`finetune train` in a child process (its own process group) on a dataset big enough for epochs of ~1 s."""
    data = write_folder_dataset(tmp_path / "data", per_class=30, val_per_class=4)
    raw = apply_overrides({}, TINY_OVERRIDES + EXTRAS + [
        f"train.epochs={epochs}", "data.batch_size=4", f"data.num_workers={workers}", f"output={tmp_path / 'runs'}",
        "name=crash"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    log = tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "train", str(recipe), "--data", str(data)],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        # A child of a background job may start with SIGINT ignored; Ctrl-C must reach it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return process, tmp_path / "runs" / "crash", log


def wait_for_epochs(process: subprocess.Popen, run_dir: Path, log: Path, count: int, timeout: float = 120) -> None:
    """Return as soon as history.csv has `count` epochs."""
    history = run_dir / "history.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The row is the last thing an epoch writes: once it is there, the next epoch is under way.
        if history.exists() and len(history.read_text().splitlines()) > count:
            assert (run_dir / "curves.png").is_file()  # drawn every epoch, not only at the end
            return
        if process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no epoch {count} after {timeout}s:\n{log.read_text()[-3000:]}")


def test_kill_9_mid_epoch_then_resume_finishes_with_every_epoch_once(tmp_path):
    process, run_dir, log = start_training(tmp_path, epochs=4)
    wait_for_epochs(process, run_dir, log, count=1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert epochs_in(run_dir) in ([1], [1, 2])  # killed in epoch 2 (or, rarely, right after it)
    # A torn write of the next row, as a kill during the append would leave.
    with (run_dir / "history.csv").open("a") as handle:
        handle.write("2,0.41")
    assert main(["train", "--resume", str(run_dir / "last.pt")]) == 0
    assert epochs_in(run_dir) == [1, 2, 3, 4]
    for name in ("best.pt", "last.pt"):
        loaded = load_model(run_dir / name)
        assert loaded.classes == ["blue", "green", "red"]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 4
    assert (run_dir / "eval" / "confusion_matrix.png").is_file()


def test_ctrl_c_leaves_a_loadable_last_pt_and_a_message_not_a_traceback(tmp_path):
    process, run_dir, log = start_training(tmp_path, epochs=6, workers=2)
    wait_for_epochs(process, run_dir, log, count=1)
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the trainer and its loader workers
    process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == 130, output
    assert "Traceback" not in output, output
    assert "interrupted" in output and f"finetune train --resume {run_dir}" in output
    saved = load_model(run_dir / "last.pt")
    assert saved.checkpoint["epoch"] == epochs_in(run_dir)[-1] >= 1
