"""Progress lines when the log is not a terminal: the first step's start-up time, then step, images/s, time left."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import TINY_OVERRIDES, write_folder_dataset
from finetune.engine import progress as progress_module
from finetune.engine.progress import Progress, seconds_since_process_start
from finetune.workflows.api import train


class _Clock:
    now = 100.0


def test_a_line_every_interval_with_images_per_second_and_the_time_left(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock.now)
    lines: list[str] = []
    progress = Progress(lines.append, every=10.0, images_per_step=32, steps=100, description="epoch 1/2",
                        first_of_run=True, on_terminal=False)
    for _ in range(30):  # 2 s a step: a line after steps 5, 10, 15, ... (10 s apart)
        clock.now += 2.0
        progress.step()
    assert lines[0].startswith("first training step done")
    assert lines[1] == "epoch 1/2: step 5/100 (5%), 16 images/s, 3.2 min left in the epoch"
    assert len(lines) == 1 + 6 and lines[-1].startswith("epoch 1/2: step 30/100 (30%), 16 images/s, 2.3 min left")


def test_no_lines_on_a_terminal_or_with_zero_and_the_first_line_once_per_run() -> None:
    for every, terminal in ((0.0, False), (1e-9, True)):
        lines: list[str] = []
        progress = Progress(lines.append, every=every, images_per_step=8, steps=50, description="epoch 2/2",
                            first_of_run=False, on_terminal=terminal)
        for _ in range(20):
            progress.step()
        assert lines == []


def test_seconds_since_the_process_started_is_read_from_proc() -> None:
    since = seconds_since_process_start()
    if os.path.exists("/proc/self/stat"):
        assert since is not None and 0.0 <= since < 24 * 3600
    else:
        assert since is None


def test_training_logs_its_first_step_and_progress_when_not_on_a_terminal(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=8, val_per_class=2, test=0)
    lines: list[str] = []
    overrides = [*TINY_OVERRIDES, "train.epochs=2", "data.batch_size=4", "train.progress_every=0.000001",
                 f"output={tmp_path / 'runs'}"]
    train(None, data=data, overrides=overrides, log=lines.append)
    assert sum(line.startswith("first training step done") for line in lines) == 1  # once per run, not per epoch
    steps = [line for line in lines if re.match(r"epoch \d/2: step \d+/\d+ \(\d+%\), \d+ images/s", line)]
    assert {line[:9] for line in steps} == {"epoch 1/2", "epoch 2/2"}
