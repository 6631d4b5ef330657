"""Progress lines for logs that are not a terminal: when the first optimiser step is done (the start-up cost, from
the command), then every few seconds the epoch's step, images/s and the time left in it.

On a terminal the tqdm bar shows the same; under nohup, SLURM, a notebook's captured output or a pipe that bar is
off, and an epoch of a large data set (tens of thousands of steps) would otherwise say nothing for an hour.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

__all__ = ["Progress", "seconds_since_process_start"]


def seconds_since_process_start() -> Optional[float]:
    """Seconds since this process was started (Linux /proc; None elsewhere): the interpreter's and the imports'
    start-up included, as a user waits for it."""
    try:
        with open("/proc/self/stat") as handle:
            # The command name (field 2) may hold spaces: the fields after its closing parenthesis are fixed.
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


class Progress:
    """Counts one epoch's optimiser steps and logs, when output is not a terminal, a line every `every` seconds."""

    def __init__(self, log: Callable[[str], None], every: float, images_per_step: int, steps: int,
                 description: str, first_of_run: bool, on_terminal: Optional[bool] = None) -> None:
        self.log, self.every, self.images_per_step, self.steps = log, every, images_per_step, steps
        self.description, self.first_of_run = description, first_of_run
        terminal = sys.stderr.isatty() if on_terminal is None else on_terminal
        self.quiet = every <= 0 or terminal  # the tqdm bar reports on a terminal
        self.started = self.last = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        """One optimiser step done."""
        self.done += 1
        if self.done == 1 and self.first_of_run:
            since = seconds_since_process_start()
            self.log("first training step done" + (f", {since:.1f} s after the command started" if since else ""))
        now = time.perf_counter()
        if self.quiet or now - self.last < self.every or self.done >= self.steps:
            return
        self.last = now
        rate = self.done * self.images_per_step / max(now - self.started, 1e-9)
        left = (self.steps - self.done) * (now - self.started) / self.done
        self.log(f"{self.description}: step {self.done}/{self.steps} ({self.done / self.steps:.0%}), "
                 f"{rate:.0f} images/s, {_duration(left)} left in the epoch")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
