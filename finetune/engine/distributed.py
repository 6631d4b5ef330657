"""Multi-process training with torch.distributed: process group, device per rank, DDP wrapping, reductions.

torchrun (`python -m torch.distributed.run`) starts the processes and sets RANK, LOCAL_RANK and
WORLD_SIZE; nothing here launches or talks to processes by other means. Without torchrun every
helper is a no-op for a single process, so the training code reads the same either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.errors import FinetuneError

__all__ = ["launched_by_torchrun", "relaunch", "setup", "cleanup", "active", "independent", "rank", "world_size",
           "is_main", "barrier", "broadcast_object", "gather_objects", "reduce_sums", "shard_bounds", "shard", "unshard", "rank_seed",
           "wrap", "unwrap", "sync_context", "sync_buffers", "convert_sync_bn"]

T = TypeVar("T")

# Inside `independent()`: each process works alone (its own k-fold folds), as if no other process existed.
_independent = False


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher with its environment) started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(argv: list[str], devices: int) -> int:
    """`finetune ARGV` (a command without --devices) under torchrun on N processes of this machine; its exit status.

    N processes train one run with DDP, or with --folds, N folds side by side (one per device, no DDP).
    """
    if devices < 1:
        raise FinetuneError(f"--devices {devices}: give the number of processes (GPUs) to train on, e.g. --devices 2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "-m", "finetune", *argv]
    print("running: " + " ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def active() -> bool:
    """True inside an initialised process group of more than one process (and not in `independent()`)."""
    return not _independent and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 for a plain run, and inside `independent()`)."""
    if _independent:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes training together (1 for a plain run, and inside `independent()`)."""
    if _independent:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def independent() -> Iterator[None]:
    """Within: this process trains on its own (no DDP, no collectives) and writes its own run folders.

    K-fold under torchrun uses it to train different folds side by side, one process per device.
    """
    global _independent
    previous, _independent = _independent, True
    try:
        yield
    finally:
        _independent = previous


def is_main() -> bool:
    """Rank 0: the process that writes and prints (the one place that decides it; everything else asks here)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device.

    NCCL on CUDA, gloo on CPU; each process of a node takes GPU number LOCAL_RANK. A plain run
    (no torchrun) gets `device` back untouched.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FinetuneError(f"torchrun started local rank {local_rank} but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s); lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def cleanup() -> None:
    """Leave the process group (after the last collective call)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint the others read)."""
    if active():
        dist.barrier()


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` on every rank (a picklable object: a path, a decision)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks (in float64, so counts and summed losses stay exact)."""
    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def shard_bounds(count: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of `count` items: no padding, no item twice.

    The first `count % world` ranks take one item more, so rank order concatenation is the original order.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(count, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous slice of `items` (all of them in a plain run)."""
    start, stop = shard_bounds(len(items))
    return list(items[start:stop])


def unshard(part: Sequence[T]) -> list[T]:
    """Undo `shard`: every rank's slice, concatenated in rank order (the original order), on every rank."""
    return [item for piece in gather_objects(list(part)) for item in piece]


def rank_seed(seed: int) -> int:
    """A seed for this rank's random streams (augmentation, workers): `seed` itself on rank 0."""
    return (seed + 1_000_003 * rank()) % 2**32  # numpy takes seeds below 2**32 only


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model DDP-wrapped for training when several processes train; the model itself otherwise.

    DDP registers the parameters that require grad when it is built, so call it again whenever the
    trainable set changes (gradual unfreezing, fine_tune). Building it broadcasts rank 0's weights.
    """
    if not active():
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise FinetuneError("no parameter is trainable; check model.trainable / train.unfreeze")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_context(model: nn.Module, sync: bool) -> AbstractContextManager:
    """`model.no_sync()` on a batch whose gradients only accumulate (no optimiser step yet): no all-reduce."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def sync_buffers(*models: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so all validate the same model.

    Each rank's BN layers in train mode saw only its own batches; the weights are already equal (DDP).
    """
    if not active():
        return
    for model in {id(m): m for m in models}.values():
        for buffer in unwrap(model).buffers():
            if buffer.is_floating_point() or buffer.dtype == torch.long:
                dist.broadcast(buffer.data, src=0)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers replaced by SyncBatchNorm (statistics over the global batch); CUDA only."""
    if device.type != "cuda":
        raise FinetuneError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); "
                            "set train.sync_bn=false")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
