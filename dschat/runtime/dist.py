"""Process-group helpers that also work in a single process without torch.distributed.

Every collective of the package goes through this module, DeepSpeed's ZeRO-3 parameter gathers included. Tensors are moved to the process group's
communication device first (NCCL only takes CUDA tensors, gloo only CPU ones) and the result comes back
on the caller's device, so callers never need to know which backend runs.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import math
import os
import socket
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    """Whether a torch.distributed process group is up."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return tdist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """Rank within this node (LOCAL_RANK from the launcher, 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return tdist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    """Whether this is global rank 0."""
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_device() -> None:
    """Make this rank's own accelerator (LOCAL_RANK) the current device; a no-op on DeepSpeed's CPU accelerator.

    Must run before the first collective: NCCL runs a collective on the current device, which is device 0 on
    every rank until someone sets it (DeepSpeed's engine does, but only in `deepspeed.initialize`, after the
    data set-up's collectives); several ranks on one GPU fail with "Duplicate GPU" or hang.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank())


def init_distributed() -> None:
    """Start the process group (gloo on CPU, nccl on CUDA), also for a plain single-process `python main.py`;
    each rank's accelerator is bound to its LOCAL_RANK first."""
    import deepspeed

    if is_dist():
        bind_device()
        return
    if os.environ.get("WORLD_SIZE", "1") == "1":
        _skip_shm_op()
    launched = "RANK" in os.environ
    if not launched:  # not started by a launcher: be a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    bind_device()  # before the process group and its first collective
    if launched:
        deepspeed.init_distributed(verbose=False)
    else:
        for attempt in range(3):
            os.environ["MASTER_PORT"] = str(_free_port())
            try:
                deepspeed.init_distributed(verbose=False)
                break
            except tdist.DistNetworkError:  # the free port was taken before we bound it; pick another
                if attempt == 2:
                    raise
    atexit.register(_remove_shm_buffers, os.environ.get("MASTER_PORT", ""), rank())


def _skip_shm_op() -> None:
    """A world of one has nothing to all-reduce: skip DeepSpeed's CPU shared-memory op.

    On CPU, DeepSpeed JIT-compiles that op (1-2 minutes on a fresh machine) and maps a 69 MB /dev/shm
    buffer for every process group, even for a single process; without it, torch.distributed is used.
    """
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: the package's `torch` attribute is torch itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def _remove_shm_buffers(port: str, this_rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a 69 MB /dev/shm file per rank and port; remove ours."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_{this_rank}"):
        with contextlib.suppress(OSError):
            os.remove(path)


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_dist():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


DEVICE_BACKENDS = {"nccl": "cuda", "hccl": "npu", "xccl": "xpu", "ccl": "xpu"}


def comm_device() -> torch.device:
    """The device the process group's backend communicates from: this rank's own accelerator (cuda:LOCAL_RANK)
    for NCCL and its kin, the CPU for gloo."""
    kind = DEVICE_BACKENDS.get(str(tdist.get_backend()).lower()) if is_dist() else None
    if kind is None:
        return torch.device("cpu")
    return torch.device(kind, local_rank())  # the device bind_device made current, not whatever is current now


def to_comm(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on the communication device, for a collective to work on in place."""
    return t.detach().to(comm_device(), copy=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks, on `t`'s device (a new tensor; `t` is left as it was)."""
    if not (is_dist() and world_size() > 1):
        return t.detach().clone()
    work = to_comm(t)
    tdist.all_reduce(work, op=tdist.ReduceOp.SUM)
    return work.to(t.device)


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None) -> AbstractContextManager:
    """Context in which the ZeRO-3 partitioned ones of `params` are whole on every rank (a collective: every rank
    enters it); modifier_rank: the rank whose in-place changes are kept (None: read only). A no-op for parameters
    that are not partitioned. The package's only door to DeepSpeed's parameter gathers."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def needs_gather(param: torch.Tensor) -> bool:
    """Whether a ZeRO-3 gather fetches `param`: a partitioned parameter that is not kept whole between forwards."""
    return hasattr(param, "ds_id") and not getattr(param, "ds_persist", False)


def regather_from_partitions(params: Iterable[torch.nn.Parameter]) -> None:
    """Rebuild the ZeRO-3 parameters that stay whole between forwards (DeepSpeed's "persistent" small ones, such as
    norms) from their partitions, after their partitions were written in place (a collective: every rank calls
    it). Other parameters are gathered from their partitions at their next use anyway; a no-op without ZeRO-3."""
    whole = [p for p in params if hasattr(p, "ds_tensor") and p.data.numel() == p.ds_numel]
    if whole:
        whole[0].partition(whole)  # drops the stale whole copies (the partitions are kept as they are)
        whole[0].all_gather(whole)


def shard(items: list[Any]) -> tuple[list[Any], int]:
    """This rank's share of `items` and how many of them are real.

    Every rank gets the same number of items (ZeRO-3 generation needs every rank to run the same calls);
    ranks whose share runs past the end are padded with items from the start, which callers ignore.
    """
    per_rank = math.ceil(len(items) / world_size())
    start = rank() * per_rank
    mine = (items[start: start + per_rank] + items[:per_rank])[:per_rank]
    return mine, max(0, min(per_rank, len(items) - start))


def print_rank0(*args: Any, **kwargs: Any) -> None:
    """print() on global rank 0 only, flushed."""
    if is_rank0():
        print(*args, **kwargs, flush=True)
