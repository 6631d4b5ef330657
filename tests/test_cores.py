"""The core budget: cores from affinity, cgroup quota and torchrun's local processes; their split between model
threads and loader workers; the line a run prints; and the run under `taskset -c 0` that must see 1 core.

No timings here: what the budget is worth under load is measured by benchmarks/cores_benchmark.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import QUICK_CPU, TINY_OVERRIDES, write_folder_dataset
from finetune.cli import main
from finetune.config.options import InferenceOptions
from finetune.config.recipe import DataConfig, Recipe, TrainConfig
from finetune.data import cores
from finetune.data.cores import MAX_AUTO_WORKERS, cgroup_cpu_limit, core_budget, split_cores, usable_cores
from finetune.engine import fit as fit_module
from finetune.engine import threads as threads_module
from finetune.engine.threads import ThreadGovernor
from finetune.workflows.api import train
from finetune.data.loaders import make_loader
from finetune.errors import FinetuneError

ROOT = Path(__file__).resolve().parents[1]
BUDGET_LINE = re.compile(r"core budget: (\d+) cores? \((.*?)\) -> (\d+) model threads? \+ (\d+) loader workers? ")


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


@pytest.mark.parametrize("text, cores", [("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0),
                                         ("50000 100000", 0.5), ("max", None), ("garbage here", None)])
def test_cgroup_v2_cpu_max_is_quota_over_period(tmp_path: Path, text: str, cores: float) -> None:
    _write(tmp_path, "cpu.max", text)
    assert cgroup_cpu_limit(tmp_path, "0::/\n") == cores


def test_cgroup_v2_the_tightest_of_the_process_cgroup_and_its_ancestors_binds(tmp_path: Path) -> None:
    _write(tmp_path / "kubepods" / "pod1", "cpu.max", "max 100000")
    _write(tmp_path / "kubepods", "cpu.max", "300000 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 3.0
    _write(tmp_path / "kubepods" / "pod1", "cpu.max", "150000 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 1.5


def test_cgroup_v1_cfs_quota_and_period(tmp_path: Path) -> None:
    # Docker on cgroup v1: the container's own cgroup is mounted at cpu,cpuacct/ whatever path the host names.
    folder = tmp_path / "cpu,cpuacct"
    _write(folder, "cpu.cfs_quota_us", "250000\n")
    _write(folder, "cpu.cfs_period_us", "100000\n")
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_cpu_limit(tmp_path, membership) == 2.5
    _write(folder, "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cgroup_cpu_limit(tmp_path, membership) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, "0::/\n1:cpu:/\n") is None
    assert cgroup_cpu_limit(tmp_path, "") is None


@pytest.mark.parametrize("affinity, quota, local, cores", [
    (8, None, 1, 8), (8, 1.5, 1, 1), (8, 2.9, 1, 2), (8, 0.5, 1, 1), (2, 4.0, 1, 2),  # the quota is rounded down
    (8, None, 4, 2), (8, 4.0, 2, 2), (2, None, 4, 1), (1, None, 1, 1),  # torchrun's local processes share
])
def test_usable_cores_from_affinity_quota_and_local_processes(affinity: int, quota, local: int, cores: int) -> None:
    assert usable_cores(affinity, quota, local)[0] == cores


def test_usable_cores_says_what_limited_them() -> None:
    _, limits = usable_cores(16, 2.5, 2)
    assert "CPU affinity 16 cores" in limits and "cgroup CPU quota 2.5" in limits
    assert "shared by 2 local processes" in limits


@pytest.mark.parametrize("cores, share, split", [
    (1, 0.1, (1, 0)),  # one core: the data loads in the main process, between the model's steps
    (2, 0.1, (2, 1)),  # the model is most of the work: every core for it, one worker beside
    (4, 0.25, (3, 1)),  # a whole core of decoding: it is the worker's
    (8, 0.25, (6, 2)),  # two whole cores' worth of decoding go to two workers
    (16, 0.1, (15, 2)),
    (1, 1.0, (1, 1)),  # a GPU model: the worker loads while the main process waits for the GPU
    (8, 1.0, (1, 8)),
    (64, 1.0, (56, MAX_AUTO_WORKERS)),
])
def test_split_gives_the_model_every_core_the_data_does_not_need(cores: int, share: float, split: tuple) -> None:
    assert split_cores(cores, share) == split


def test_an_explicit_count_is_kept_and_the_other_chosen_around_it() -> None:
    assert split_cores(2, 0.1, threads=1) == (1, 1)
    assert split_cores(2, 0.1, workers=0) == (2, 0)
    assert split_cores(1, 0.1, workers=2) == (1, 2)  # as asked, even beyond the budget
    assert split_cores(2, 0.1, threads=4, workers=3) == (4, 3)


@pytest.fixture
def machine(monkeypatch):
    """A pretend machine: set its affinity, quota and LOCAL_WORLD_SIZE; torch keeps up to 64 threads."""
    def pretend(affinity: int, quota=None, local: int = 1) -> None:
        monkeypatch.setattr(cores, "affinity_cores", lambda: affinity)
        monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: quota)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    previous = torch.get_num_threads()
    yield pretend
    torch.set_num_threads(previous)


def test_an_affinity_of_one_core_trains_on_one_thread_and_loads_in_the_main_process(monkeypatch, machine) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cores.affinity_cores() == 1
    machine(1)
    budget = core_budget("train", "cpu")
    assert (budget.cores, budget.threads, budget.workers) == (1, 1, 0)
    assert budget.describe().startswith("core budget: 1 core (CPU affinity 1 core, no cgroup CPU quota) -> "
                                        "1 model thread + 0 loader workers (train on cpu)")


def test_a_quota_limits_a_machine_that_shows_more_cores(machine) -> None:
    machine(64, quota=2.0)
    budget = core_budget("train", "cpu")
    assert (budget.cores, budget.workers) == (2, 1) and "cgroup CPU quota 2" in budget.limits


def test_under_torchrun_each_local_process_gets_its_share(machine) -> None:
    torch.set_num_threads(8)
    machine(8, local=4)
    budget = core_budget("train", "cpu")
    assert (budget.cores, budget.threads, budget.workers) == (2, 2, 1)
    assert "shared by 4 local processes" in budget.describe()


def test_automatic_threads_never_exceed_what_the_process_was_given(machine, one_torch_thread) -> None:
    machine(8)
    budget = core_budget("predict", "cpu")
    assert budget.threads == 1 and "threads kept at the process's 1" in budget.split
    assert core_budget("predict", "cpu", threads=3).threads == 3  # an explicit count is taken as it is


def test_explicit_settings_are_named_in_the_line(machine) -> None:
    machine(4)
    line = core_budget("predict", "cpu", threads=1, workers=0, keys=("--threads", "--workers")).describe()
    assert "1 model thread + 0 loader workers" in line and "threads from --threads" in line
    assert "workers from --workers" in line


def test_apply_threads_sets_torchs_intra_op_threads(machine) -> None:
    machine(1)
    cores.apply_threads(core_budget("train", "cpu"))
    assert torch.get_num_threads() == 1


def _threads_in_worker(_: int) -> tuple[int, int]:
    import cv2

    return torch.get_num_threads(), cv2.getNumThreads()


class _Probe(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int]:
        return _threads_in_worker(index)


def test_each_loader_worker_runs_one_torch_and_one_opencv_thread() -> None:
    import cv2  # noqa: F401  (loaded in the parent, as the transforms load it)

    loader = make_loader(_Probe(), batch_size=1, num_workers=1)
    assert {(int(t), int(c)) for t, c in loader} == {(1, 1)}


def test_recipe_and_options_accept_auto_and_counts_and_refuse_the_rest() -> None:
    assert DataConfig().num_workers is None and TrainConfig().threads is None
    recipe = Recipe.from_dict({"data": {"num_workers": 2}, "train": {"threads": 1}})  # YAML as written before
    assert recipe.data.num_workers == 2 and recipe.train.threads == 1
    with pytest.raises(FinetuneError, match="data.num_workers.*null to let the core budget choose"):
        DataConfig(num_workers=-1)
    with pytest.raises(FinetuneError, match="train.threads.*at least 1"):
        TrainConfig(threads=0)
    with pytest.raises(FinetuneError, match="must be int"):
        Recipe.from_dict({"train": {"threads": "auto"}})
    with pytest.raises(FinetuneError, match="--threads must be a whole number of at least 1"):
        InferenceOptions(threads=0)
    assert InferenceOptions().num_workers is None and InferenceOptions(num_workers=0).num_workers == 0


class _Clock:
    """A fake perf_counter: each step() advances it by the step time the current thread count takes."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.now, self.seconds = 0.0, seconds

    def tick(self) -> None:
        self.now += self.seconds[torch.get_num_threads()]


def _steps(governor: ThreadGovernor, clock: _Clock, count: int) -> None:
    for _ in range(count):
        clock.tick()
        governor.step()


def test_the_thread_governor_keeps_the_faster_of_the_budget_and_one_thread(monkeypatch) -> None:
    previous = torch.get_num_threads()
    clock = _Clock({2: 1.0, 1: 1.6})  # a quiet machine: two threads are faster
    monkeypatch.setattr(threads_module.time, "perf_counter", lambda: clock.now)
    lines: list[str] = []
    try:
        torch.set_num_threads(2)
        governor = ThreadGovernor(2, lines.append, window=3, warmup=1, recheck=20)
        governor.epoch_start()
        _steps(governor, clock, 1 + 3 + 1 + 3 + 1)  # warm-up, 3 with two threads, the switch, 3 with one, the switch
        assert governor.chosen == 2 and torch.get_num_threads() == 2 and not lines
        clock.seconds = {2: 3.0, 1: 1.2}  # another process starts: two threads now wait for each other
        _steps(governor, clock, 3 + 1 + 3 + 1 + 3)  # slowed by more than `drift` over 3 steps: probe again
        assert governor.chosen == 1 and torch.get_num_threads() == 1
        assert lines == ["model threads: 1 (a step took 1.20 s with 1 thread, 3.00 s with 2: other work is using the "
                         "cores)"]
        clock.seconds = {2: 1.0, 1: 1.6}  # it stops: after `recheck` steps on one thread, probe again
        _steps(governor, clock, 1 + 20 + 1 + 3 + 1 + 3)
        assert governor.chosen == 2 and torch.get_num_threads() == 2 and "the cores are free" in lines[-1]
    finally:
        torch.set_num_threads(previous)


def test_training_runs_the_governor_only_with_automatic_threads_on_a_cpu(tmp_path: Path, monkeypatch) -> None:
    made: list[int] = []
    real = fit_module.ThreadGovernor
    monkeypatch.setattr(fit_module, "ThreadGovernor", lambda threads, log: made.append(threads) or real(threads, log))
    data = write_folder_dataset(tmp_path / "data", per_class=4, val_per_class=2, test=0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for extra in ([], ["train.threads=2"]):
            overrides = [*TINY_OVERRIDES, "train.epochs=1", f"output={tmp_path / 'runs'}", *extra]
            train(None, data=data, overrides=overrides, log=lambda line: None)
    finally:
        torch.set_num_threads(previous)
    assert made == [2]  # the automatic run has one; train.threads=2 fixes the count, so the second has none


def _tiny(tmp_path: Path, auto_workers: bool) -> list[str]:
    sets = [o for o in TINY_OVERRIDES if not (auto_workers and o.startswith("data.num_workers"))]
    sets += ["train.epochs=1", f"output={tmp_path / 'runs'}"]
    return [arg for value in sets for arg in ("--set", value)]


def test_a_cli_training_run_prints_its_budget_and_records_its_workers(tmp_path: Path, capsys, one_torch_thread) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=6, val_per_class=2, test=1)
    assert main(["train", QUICK_CPU, "--data", str(data), *_tiny(tmp_path, auto_workers=True)]) == 0
    out = capsys.readouterr().out
    found = BUDGET_LINE.search(out)
    assert found, out
    workers = int(found.group(4))
    assert found.group(3) == "1"  # the process was given one thread: auto does not raise it
    saved = yaml.safe_load((tmp_path / "runs" / "quick_cpu" / "recipe.yaml").read_text())
    assert saved["data"]["num_workers"] == workers and saved["train"]["threads"] is None


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_under_taskset_one_core_the_run_budgets_one_core(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=6, val_per_class=2, test=1)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    command = ["taskset", "-c", "0", sys.executable, "-m", "finetune", "train", QUICK_CPU, "--data", str(data),
               *_tiny(tmp_path, auto_workers=True)]
    done = subprocess.run(command, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "core budget: 1 core (CPU affinity 1 core" in done.stdout, done.stdout
    assert "-> 1 model thread + 0 loader workers" in done.stdout
    assert "OpenMP waits: OpenMP's default" in done.stdout  # no wait policy of ours: threads adapt instead
