"""Training, evaluation and prediction under torchrun: 2 CPU processes (gloo) against 1, on generated images.

The runs use no random augmentation, no dropout and a BatchNorm-free model (timm's test_convnext), so a
1-process run with batch 2B and a 2-process run with batch B per process see the same global batches and
must agree to float precision. Each torchrun start costs seconds on 2 cores: the module shares two runs.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import QUICK_CPU, write_folder_dataset
from finetune.workflows import api
from finetune.engine.distributed import shard_bounds
from finetune.config.options import InferenceOptions, SubmissionOptions

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
OVERRIDES = [
    "model.backbone=test_convnext", "data.image_size=32", "data.num_workers=0", f"train.epochs={EPOCHS}",
    "train.lr=0.01", "train.warmup_epochs=0", "augment.preset=none", "model.head.dropout=0", "model.head.hidden=[]",
    # stages.3 and the head train from the start; stages.2 joins in epoch 2 (DDP must be rebuilt for it)
    "model.trainable_last=1", "train.unfreeze={2: [stages.2]}", "name=ddp",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _finetune(*args: str, torchrun: bool = True, **popen) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, "-m", "finetune", *args], env=_env(), capture_output=True, text=True,
                          timeout=180, **popen)


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def _history(run: Path) -> list[dict]:
    with (run / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def _rows(path: Path) -> list[list[str]]:
    with path.open() as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process run (batch 16, in this process) and a 2-process run (batch 8 each, via --devices 2)."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_folder_dataset(tmp / "data", per_class=16, val_per_class=5, test=7)  # 48 train, 15 val, 7 test
    (tmp / "two" / "ddp").mkdir(parents=True)  # the name is taken: rank 0 must pick ddp-2 for both ranks
    snapshot = tmp / "one_epoch1.pt"

    def keep_epoch1(row: dict) -> bool:
        if int(row["epoch"]) == 1:
            shutil.copy(tmp / "one" / "ddp" / "last.pt", snapshot)
        return False

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.train(QUICK_CPU, data=data, overrides=OVERRIDES + ["data.batch_size=16", f"output={tmp / 'one'}"],
                  on_epoch=keep_epoch1, log=lambda line: None)
    finally:
        torch.set_num_threads(previous)
    done = _finetune("train", QUICK_CPU, "--data", str(data), "--devices", "2",
                     *_sets(OVERRIDES + ["data.batch_size=8", f"output={tmp / 'two'}"]), torchrun=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tmp": tmp, "data": data, "one": tmp / "one" / "ddp", "two": tmp / "two" / "ddp-2",
            "epoch1": snapshot, "stdout": done.stdout}


def test_two_processes_match_one_with_the_same_global_batch(runs):
    one, two = _history(runs["one"]), _history(runs["two"])
    assert [r["epoch"] for r in two] == [str(e) for e in range(1, EPOCHS + 1)]  # one history, each epoch once
    for a, b in zip(one, two):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-4), (a["epoch"], key)
    # The validation set (15 images, odd) is evaluated exactly once per image, in order, with the same answers.
    pred_one = _rows(runs["one"] / "eval" / "predictions.csv")
    pred_two = _rows(runs["two"] / "eval" / "predictions.csv")
    assert len(pred_two) == 16 and [r[:3] for r in pred_one] == [r[:3] for r in pred_two]
    # The effective batch and the rate are stated in the log and in the recipe copy.
    note = "2 process(es) x data.batch_size 8 x train.accumulate 1 = effective batch 16, train.lr 0.01"
    assert note in runs["stdout"] and note in (runs["two"] / "recipe.yaml").read_text().splitlines()[0]


def test_only_rank_zero_writes_and_prints(runs):
    parent = runs["two"].parent
    assert sorted(p.name for p in parent.iterdir()) == ["ddp", "ddp-2"]  # ddp was taken; one new folder
    assert not any((parent / "ddp").iterdir())
    assert sorted(p.name for p in runs["two"].glob("*.pt")) == ["best.pt", "last.pt"]
    assert runs["stdout"].count(f"epoch 1/{EPOCHS}  train loss") == 1  # rank 1 printed nothing


def test_unfreezing_under_ddp_changes_exactly_the_newly_trainable_parameters(runs):
    first = torch.load(runs["epoch1"], weights_only=True)["model_state"]
    final_one = torch.load(runs["one"] / "last.pt", weights_only=True)["model_state"]
    final_two = torch.load(runs["two"] / "last.pt", weights_only=True)["model_state"]
    changed = {name for name, value in final_two.items()
               if value.is_floating_point() and not torch.equal(value, first[name])}
    newly = [name for name, value in final_two.items()
             if name.startswith("backbone.stages.2.") and value.is_floating_point()]
    assert newly and set(newly) <= changed  # unfrozen in epoch 2: every one of them trained (all ranks in step)
    frozen = ("backbone.stem", "backbone.stages.0.", "backbone.stages.1.")  # never trainable in this run
    assert not any(name.startswith(frozen) for name in changed)
    assert any(name.startswith("backbone.stages.3.") for name in changed)
    for name, value in final_two.items():  # and trained as one process with the global batch would have
        if value.is_floating_point():
            assert torch.allclose(value, final_one[name], atol=1e-4), name


def test_evaluate_and_predict_on_two_processes_equal_one_on_odd_counts(runs):
    tmp, data, best = runs["tmp"], runs["data"], str(runs["one"] / "best.pt")
    torch.set_num_threads(1)
    api.evaluate(best, data / "val", out=tmp / "eval_one", inference=InferenceOptions(num_workers=0),
                 log=lambda line: None)
    api.predict(best, data / "test", out=tmp / "sub_one.csv", submission=SubmissionOptions(probs=True),
                inference=InferenceOptions(num_workers=0), log=lambda line: None)
    # One torchrun start for both (each start costs seconds): the API calls that the CLI commands make.
    script = tmp / "eval_and_predict.py"
    script.write_text(
        "from finetune.workflows import api\nfrom finetune.engine.distributed import cleanup\n"
        "from finetune.config.options import InferenceOptions, SubmissionOptions\n"
        f"api.evaluate({best!r}, {str(data / 'val')!r}, out={str(tmp / 'eval_two')!r}, "
        "inference=InferenceOptions(num_workers=0))\n"
        f"api.predict({best!r}, {str(data / 'test')!r}, out={str(tmp / 'sub_two.csv')!r}, "
        "submission=SubmissionOptions(probs=True), inference=InferenceOptions(num_workers=0))\n"
        "cleanup()\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _rows(tmp / "eval_one" / "predictions.csv"), _rows(tmp / "eval_two" / "predictions.csv")
    assert len(two) == 16 and [r[:3] for r in one] == [r[:3] for r in two]
    assert _rows(tmp / "sub_one.csv") == _rows(tmp / "sub_two.csv") and len(_rows(tmp / "sub_two.csv")) == 8
    for a, b in zip(_rows(tmp / "sub_one_probs.csv")[1:], _rows(tmp / "sub_two_probs.csv")[1:]):
        assert a[0] == b[0] and [float(x) for x in a[1:]] == pytest.approx([float(x) for x in b[1:]], abs=1e-5)


def test_shards_cover_every_item_once_in_order():
    for count in (0, 1, 7, 15, 16):
        for world in (1, 2, 3):
            bounds = [shard_bounds(count, rank, world) for rank in range(world)]
            assert [i for start, stop in bounds for i in range(start, stop)] == list(range(count))


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` among the launcher's descendants (via /proc)."""
    pending, seen = [launcher], set()
    while pending:
        pid = pending.pop()
        seen.add(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher and f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
        pending += [int(c) for c in children if int(c) not in seen]
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_kill_one_rank_then_resume_continues_exactly(runs):
    out = runs["tmp"] / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "finetune",
               "train", QUICK_CPU, "--data", str(runs["data"]),
               *_sets(OVERRIDES + ["data.batch_size=8", f"output={out}"])]
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / "ddp" / "history.csv"
    deadline = time.monotonic() + 120
    while launcher.poll() is None and time.monotonic() < deadline:
        if history.is_file() and len(history.read_text().splitlines()) >= 2:  # epoch 1 and its last.pt are saved
            pid = _worker_pid(launcher.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    launcher.wait(timeout=120)
    if launcher.returncode == 0:
        pytest.skip("the run finished before a rank could be killed (machine too fast for this check)")
    saved = len(_history(out / "ddp"))
    assert 1 <= saved < EPOCHS
    assert len(torch.load(out / "ddp" / "last.pt", weights_only=True)["resume"]["rng_ranks"]) == 2
    done = _finetune("train", "--resume", str(out / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note:" not in done.stdout  # same world size: no warning, an exact continuation
    assert [r["epoch"] for r in _history(out / "ddp")] == [str(e) for e in range(1, EPOCHS + 1)]
    resumed = torch.load(out / "ddp" / "last.pt", weights_only=True)["model_state"]
    uninterrupted = torch.load(runs["two"] / "last.pt", weights_only=True)["model_state"]
    for name, value in resumed.items():
        assert torch.equal(value, uninterrupted[name]), name


def test_resume_on_another_world_size_says_so(runs, tmp_path, capsys):
    copy = tmp_path / "ddp"
    shutil.copytree(runs["two"], copy)
    torch.set_num_threads(1)
    api.train(resume=copy, overrides=[f"train.epochs={EPOCHS + 1}"])
    assert "saved by 2 process(es) and resumes on 1" in capsys.readouterr().out
    assert [r["epoch"] for r in _history(copy)] == [str(e) for e in range(1, EPOCHS + 2)]


def test_folds_side_by_side_on_two_processes_equal_folds_one_after_another(runs, tmp_path):
    from finetune.workflows.kfold import train_kfold

    overrides = OVERRIDES + ["data.batch_size=8"]
    torch.set_num_threads(1)
    one = train_kfold(QUICK_CPU, 2, data=runs["data"], overrides=overrides + [f"output={tmp_path / 'one'}"],
                      log=lambda line: None)
    done = _finetune("train", QUICK_CPU, "--data", str(runs["data"]), "--folds", "2", "--devices", "2",
                     *_sets(overrides + [f"output={tmp_path / 'two'}"]), torchrun=False)
    assert done.returncode == 0, done.stderr[-3000:]
    parent = tmp_path / "two" / "ddp"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ddp"]
    assert sorted(p.name for p in parent.glob("fold*")) == ["fold1", "fold2"]
    assert "[fold 2/2]" not in done.stdout  # fold 2 ran on process 1, which prints nothing
    summary_one = (one.run_dir / "oof_predictions.csv").read_text()
    assert (parent / "oof_predictions.csv").read_text() == summary_one.replace(str(one.run_dir), str(parent))


def test_sync_bn_replaces_every_batchnorm_and_refuses_the_cpu():
    from finetune.engine.distributed import convert_sync_bn
    from finetune.errors import FinetuneError
    from finetune.models import build_model
    from finetune.config.recipe import ModelConfig

    model, _ = build_model(ModelConfig(backbone="test_resnet", pretrained=False), 3, 32)
    count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with pytest.raises(FinetuneError, match="train.sync_bn needs CUDA"):
        convert_sync_bn(model, torch.device("cpu"))
    converted = convert_sync_bn(model, torch.device("cuda", 0))  # converting needs no GPU; running it does
    assert count > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == count
