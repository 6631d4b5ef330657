"""Adaptive model threads: while training runs on a CPU, time the steps and keep the faster of the core budget's
threads and a single thread.

Several intra-op threads win on a quiet machine: every parallel region is split over idle cores, and OpenMP's
spinning waits (its default) hand work on within microseconds. Beside another busy process they lose badly: a
region waits for its slowest thread, and a thread without a core of its own waits a scheduler slice while its
partner spins (a Lite0 step, batch 32, 96 px, on 2 cores: 0.85 s with 2 threads quiet; beside one busy process
2.66 s with 2 threads, 1.14 s with 1). Sleeping waits (OMP_WAIT_POLICY=PASSIVE) hold up under load (1.56 s) but
cost every quiet step a wake-up (1.22-1.39 s). Which setting wins is a property of the moment, not of the machine —
another job may start an hour into a run — so it is measured, the way cuDNN's benchmark mode picks an algorithm:
a few steps with each, then the faster, measured again when the steps slow down (load arrived) or, on one thread,
every `recheck` steps (load may have left). A thread count changes no result beyond float rounding.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

__all__ = ["ThreadGovernor"]

Log = Callable[[str], None]


class ThreadGovernor:
    """Picks the model's intra-op thread count, `threads` or 1, from the timed steps of the running job.

    Call `epoch_start()` before each epoch's steps and `step()` after each optimiser step. The first `warmup` steps
    of an epoch are not timed (workers starting, first batches). A probe times `window` steps with `threads`, then
    `window` with one; one thread is kept when it is faster by `margin` or more.
    """

    def __init__(self, threads: int, log: Optional[Log] = None, window: int = 4, warmup: int = 2,
                 margin: float = 0.85, drift: float = 1.4, recheck: int = 150) -> None:
        self.threads, self.log = threads, log
        self.window, self.warmup, self.margin, self.drift, self.recheck = window, warmup, margin, drift, recheck
        self.current = self.chosen = threads
        self.reference: Optional[float] = None  # the chosen setting's median step time when it was chosen
        self._probe: dict[int, list[float]] = {}
        self._probing: Optional[int] = threads  # the setting being timed; None when settled
        self._recent: list[float] = []
        self._since_choice = 0
        self._last: Optional[float] = None
        self._skip = warmup

    def epoch_start(self) -> None:
        """A new epoch: the next steps include the loader's start, so they are not timed."""
        self._last, self._skip = None, self.warmup

    def step(self) -> None:
        """One optimiser step has finished: time it and act on what the timings say."""
        now = time.perf_counter()
        last, self._last = self._last, now
        if self._skip > 0 or last is None:
            self._skip = max(0, self._skip - 1)
            return
        seconds = now - last
        if self._probing is not None:
            self._time_probe(seconds)
        else:
            self._watch(seconds)

    def _use(self, threads: int) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.current = threads

    def _time_probe(self, seconds: float) -> None:
        """Collect `window` steps of the setting being probed; then probe one thread, or choose."""
        times = self._probe.setdefault(self._probing, [])
        times.append(seconds)
        if len(times) < self.window:
            return
        if self._probing == self.threads:
            self._probing = 1
            self._use(1)
            self._last = None  # the switch itself is not part of a step
            return
        many, one = statistics.median(self._probe[self.threads]), statistics.median(self._probe[1])
        choice = 1 if one < self.margin * many else self.threads
        if self.log is not None and choice != self.chosen:
            self.log(f"model threads: {choice} (a step took {one:.2f} s with 1 thread, {many:.2f} s with "
                     f"{self.threads}: {'other work is using the cores' if choice == 1 else 'the cores are free'})")
        self._use(choice)
        self.chosen = choice
        self.reference, self._probing, self._probe = (one if choice == 1 else many), None, {}
        self._recent, self._since_choice, self._last = [], 0, None

    def _watch(self, seconds: float) -> None:
        """Settled: probe again when steps have slowed by `drift`, or after `recheck` steps on one thread."""
        self._since_choice += 1
        self._recent = (self._recent + [seconds])[-self.window:]
        slowed = len(self._recent) == self.window and statistics.median(self._recent) > self.drift * self.reference
        stale = self.current == 1 and self.threads > 1 and self._since_choice >= self.recheck
        if slowed or stale:
            self._probing = self.threads
            self._use(self.threads)
            self._last = None
