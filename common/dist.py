"""torch.distributed helpers: torchrun-aware init, rank helpers, collectives, seeding.

A plain `python script.py` is a world of one and every helper is a no-op there; under
`torchrun` the process group is nccl on CUDA and gloo on CPU. `torchrun --nproc_per_node=1`
creates no group either, unless `FORCE_PROCESS_GROUP=1` is set: then DDP, SyncBatchNorm and
the collectives run on one GPU as they would on eight (the GPU suite does this).

Collectives wait at most `DIST_TIMEOUT_MIN` minutes (default 60; NCCL's own default is 10):
long single-rank work (a picture, a summary) stays well inside it, and the evaluations that
take minutes are shared between the ranks.
"""
import datetime
import importlib
import os
import random

import numpy as np
import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world() -> int:
    return tdist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def timeout() -> datetime.timedelta:
    """How long a collective may wait for the slowest rank: `DIST_TIMEOUT_MIN` minutes (60)."""
    return datetime.timedelta(minutes=float(os.environ.get("DIST_TIMEOUT_MIN", 60)))


def init(device: str = "auto", cudnn_benchmark: bool = False) -> torch.device:
    """Join the torchrun world if there is one; return this process's device.

    `device`: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". A group is
    created when `WORLD_SIZE` > 1, or = 1 with `FORCE_PROCESS_GROUP=1`. On CUDA, fp32 matrix
    products and convolutions use TF32 (the practice of the official codes on A100/H100; bf16
    autocast is the default anyway), and `cudnn_benchmark` lets cuDNN autotune its
    convolution algorithms (for the fixed-shape 3-D CNNs).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = cudnn_benchmark
    size = int(os.environ.get("WORLD_SIZE", 0))
    forced = size == 1 and os.environ.get("FORCE_PROCESS_GROUP") == "1"
    if (size > 1 or forced) and not is_dist():
        # torch._dynamo (imported by torch.optim when an optimiser is built) keeps a reference
        # to the process group when it is first imported after the group exists: then
        # destroy_process_group() leaves the gloo worker threads running into interpreter
        # shutdown, where one may abort the finished process (SIGABRT, "terminate called
        # without an active exception"). Imported first, `cleanup()` joins them.
        importlib.import_module("torch._dynamo")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        tdist.init_process_group(backend=backend, timeout=timeout(), **kw)
    return dev


def cleanup() -> None:
    """Leave the process group (safe to call when there is none)."""
    if is_dist():
        tdist.barrier()
        tdist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_reduce(t: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """In-place sum or mean over ranks; returns `t` for chaining."""
    if op not in ("mean", "sum"):
        raise ValueError(f"all_reduce op must be 'mean' or 'sum', got {op!r}")
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        if op == "mean":
            t.div_(world())
    return t


@torch.no_grad()
def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0 (rank order); no gradient."""
    if not is_dist():
        return t.detach()
    out = [torch.empty_like(t) for _ in range(world())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        out = [torch.empty_like(t) for _ in range(world())]
        tdist.all_gather(out, t.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every rank's slice: sum the incoming gradients
        # over ranks, then keep this rank's slice.
        grad = grad.contiguous()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad.chunk(world(), 0)[rank()]


def all_gather_grad(t: torch.Tensor) -> torch.Tensor:
    """Like `all_gather` but gradients flow back to this rank's slice."""
    return _GatherWithGrad.apply(t) if is_dist() else t


def seed_all(seed: int, per_rank: bool = True) -> int:
    """Seed python, numpy and torch (CPU and CUDA); `seed + rank` when `per_rank`."""
    s = seed + (rank() if per_rank else 0)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, a queue) to every rank, in place.

    Under DDP with `broadcast_buffers=False` and no SyncBN each rank updates its own BN
    statistics from its own batches; call this before an evaluation that gives each rank a
    share of the data, so that every share is seen by the model in rank 0's checkpoint. No-op
    in a single process."""
    if is_dist():
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)
