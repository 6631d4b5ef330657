"""The core budget: how many CPU cores this process may really use, and how they are split between the model's
threads and the DataLoader's worker processes.

PyTorch on its own starts one intra-op thread per core it sees and knows nothing of the loader's workers beside
them, of a container's CPU quota (the container still sees every host core) or of the other processes torchrun
starts on the machine. On a busy or shared machine that collapses: a parallel region waits for its slowest thread,
and a thread without a core of its own waits for the scheduler while the others spin (a Lite0 step beside one busy
process: 2197 ms with 2 threads, 385 ms with 1). So the budget is decided once per run, printed, and applied:

- cores: CPU affinity (`os.sched_getaffinity`: taskset, cpusets) and the cgroup CPU quota (v2 `cpu.max`, v1
  `cpu.cfs_quota_us / cpu.cfs_period_us`: a container's `--cpus`), rounded down to whole cores (a thread beyond the
  quota only waits for the next period), then shared among the processes torchrun started on this machine
  (LOCAL_WORLD_SIZE). It depends on what the machine allows, never on how busy it looks at start-up: the split
  chooses the number of loader workers, which decides the augmentation streams, so a run repeats on one machine.
- split: the model gets every core except the whole cores the data needs; the loader gets enough workers for the
  data's share of the work (decoding and augmenting). On a CPU the model is most of the work (`DATA_SHARES`), so
  2 cores train with 2 threads and 1 worker; 1 core trains with 1 thread and loads in the main process (a worker
  would only take turns with the model on that core, and hand each batch over besides); on a GPU the model's CPU
  side is one thread and the workers get the rest.
- OpenMP waits are left at the runtime's default (GNU libgomp in the Linux wheels: spin, then sleep). Sleeping at
  once (OMP_WAIT_POLICY=PASSIVE, the first budget's choice) held up beside a busy process but cost a quiet machine
  1.23x per epoch (every parallel region then pays a wake-up), and shorter spins (GOMP_SPINCOUNT 300-3000) cost
  the same without the gain. What holds up under load instead is fewer threads: while training on a CPU,
  `finetune.engine.threads.ThreadGovernor` times the running steps and keeps the faster of the budget's threads
  and one. A user's own OMP_WAIT_POLICY (set before torch loads) is respected and shown in the log.

Explicit settings win: `train.threads` / `data.num_workers` in a recipe, `--threads` / `--workers` for predict and
evaluate. The automatic thread count never exceeds what the process already has (torch.set_num_threads by a caller,
OMP_NUM_THREADS). Nothing here imports torch at module level, so the CLI can import it before torch loads.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["CGROUP_ROOT", "DATA_SHARES", "MAX_AUTO_WORKERS", "CoreBudget", "affinity_cores", "cgroup_cpu_limit",
           "usable_cores", "split_cores", "core_budget", "apply_threads", "wait_policy", "single_threaded_worker"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Share of the CPU work that is decoding and augmenting (the rest is the model), by what a run does on which device.
# The demo (Lite0, 96 px, Fashion-MNIST PNGs; one thread each): decode + augment 0.55 ms per image against 21 ms of
# training step (3%); decode + evaluation preprocessing 0.7 ms against a 9.4 ms forward (7%; 9% with BatchNorm
# folded). Larger JPEG photos with a light model at 224 px should come nearer 10% and 25% (estimated, not measured
# here): the values used, as erring towards workers costs less — a worker that finishes early only waits, a model
# thread without a core stalls every barrier. On a GPU the model's CPU side is one thread launching kernels, so the
# data is the CPU's work (not run here: no GPU on this machine).
DATA_SHARES = {("train", "cpu"): 0.1, ("predict", "cpu"): 0.25, ("train", "cuda"): 1.0, ("predict", "cuda"): 1.0}
MAX_AUTO_WORKERS = 8  # beyond this, workers cost memory and start-up time for little; set data.num_workers to go higher


@dataclass(frozen=True)
class CoreBudget:
    """The cores this process may use and how they are split: model threads and loader workers, with the reasons."""

    cores: int
    threads: int
    workers: int
    limits: str  # what set `cores`: affinity, quota, local processes
    split: str  # how the threads and workers were chosen
    waits: str  # the OpenMP wait policy in effect

    def describe(self) -> str:
        """One log line: the budget, what limited it, the split and the wait policy."""
        return (f"core budget: {_count(self.cores, 'core')} ({self.limits}) -> {_count(self.threads, 'model thread')}"
                f" + {_count(self.workers, 'loader worker')} ({self.split}); OpenMP waits: {self.waits}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def affinity_cores() -> int:
    """The CPUs this process may run on (taskset, cpusets); every CPU where the platform cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _cgroup_folders(root: Path, membership: str) -> Iterator[Path]:
    """Folders whose CPU quota binds this process: its own cgroup and every ancestor, v2 and v1 hierarchies."""
    for line in membership.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, own = parts
        if controllers == "":  # v2: one hierarchy (also mounted at unified/ beside v1 ones)
            bases = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            bases = [root / "cpu", root / controllers]
        else:
            continue
        for base in bases:
            folder = base / own.lstrip("/")
            while folder != base and base in folder.parents:
                yield folder
                folder = folder.parent
            yield base  # a container's own cgroup is mounted at the base, whatever path the host gives it


def _quota(folder: Path) -> Optional[float]:
    """Cores allowed by the quota file in `folder` (v2 cpu.max or v1 cfs files); None when none or unlimited."""
    try:
        if (folder / "cpu.max").is_file():
            quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        if (folder / "cpu.cfs_quota_us").is_file():
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota_us < 0 else quota_us / period_us
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Optional[str] = None) -> Optional[float]:
    """Cores the cgroup CPU quota allows (e.g. 1.5), the tightest of the process's cgroup and its ancestors; None
    when there is no quota. `membership` is /proc/self/cgroup's text (read when None)."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    limits = [q for q in map(_quota, dict.fromkeys(_cgroup_folders(root, membership))) if q is not None]
    return min(limits) if limits else None


def usable_cores(affinity: int, quota: Optional[float] = None, local_processes: int = 1) -> tuple[int, str]:
    """Whole cores for this process (at least 1) and what limited them: affinity, the quota rounded down, and an
    equal share among the processes torchrun started on this machine."""
    cores, limits = affinity, [f"CPU affinity {_count(affinity, 'core')}"]
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota + 1e-9)))
        limits.append(f"cgroup CPU quota {quota:g}")
    else:
        limits.append("no cgroup CPU quota")
    if local_processes > 1:
        cores = max(1, cores // local_processes)
        limits.append(f"shared by {local_processes} local processes")
    return cores, ", ".join(limits)


def split_cores(cores: int, data_share: float, threads: Optional[int] = None,
                workers: Optional[int] = None) -> tuple[int, int]:
    """(model threads, loader workers) for `cores`, where `data_share` of the work is decoding and augmenting.

    Workers: enough for the data's share (at least 1, at most MAX_AUTO_WORKERS), none on a single core unless the
    data is most of the work. Threads: every core but the whole cores the workers keep busy. An explicit `threads`
    or `workers` is kept as given and the other is chosen around it.
    """
    data_cores = cores * data_share
    if workers is None:
        workers = 0 if cores == 1 and data_share < 0.5 else min(MAX_AUTO_WORKERS, max(1, math.ceil(data_cores)))
    if threads is None:
        threads = max(1, cores - math.floor(min(data_cores, workers)))
    return threads, workers


def wait_policy() -> str:
    """How idle OpenMP threads wait, as the environment says (it counts only if set before torch loaded)."""
    value = os.environ.get("OMP_WAIT_POLICY")
    if value:
        return f"OMP_WAIT_POLICY={value}"
    return "OpenMP's default (spin, then sleep)"


def core_budget(work: str, device_type: str, threads: Optional[int] = None, workers: Optional[int] = None,
                keys: tuple[str, str] = ("train.threads", "data.num_workers")) -> CoreBudget:
    """The budget for `work` (train or predict) with the model on `device_type` (cpu or cuda): cores from affinity,
    cgroup quota and LOCAL_WORLD_SIZE, split as `split_cores` does; explicit `threads`/`workers` (named by `keys`
    in the log) win. Automatic threads stay within the process's current torch thread count."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores, limits = usable_cores(affinity_cores(), cgroup_cpu_limit(), local)
    share = DATA_SHARES[(work, "cuda" if device_type == "cuda" else "cpu")]
    chosen_threads, chosen_workers = split_cores(cores, share, threads, workers)
    reasons = [f"{work} on {device_type}"]
    current = torch.get_num_threads()
    if threads is None and chosen_threads > current:
        chosen_threads = current
        reasons.append(f"threads kept at the process's {current}")
    if threads is not None:
        reasons.append(f"threads from {keys[0]}")
    if workers is not None:
        reasons.append(f"workers from {keys[1]}")
    return CoreBudget(cores, chosen_threads, chosen_workers, limits, ", ".join(reasons), wait_policy())


def apply_threads(budget: CoreBudget) -> None:
    """Run the model on the budget's intra-op threads; one inter-op thread where that can still be set."""
    import torch

    if torch.get_num_threads() != budget.threads:
        torch.set_num_threads(budget.threads)
    try:
        if torch.get_num_interop_threads() > 1:
            torch.set_num_interop_threads(1)  # only torch.jit.fork-style async work uses them; none here
    except RuntimeError:
        pass  # torch allows it once, before inter-op work starts: a caller or an earlier run got there first


def single_threaded_worker() -> None:
    """In a DataLoader worker: one thread for torch and OpenCV, so N workers use N cores, not N x cores."""
    import torch

    torch.set_num_threads(1)
    cv2 = sys.modules.get("cv2")  # albumentations' backend; loaded when the transforms were built
    if cv2 is not None:
        cv2.setNumThreads(0)  # 0: OpenCV runs its functions sequentially, in the calling thread
