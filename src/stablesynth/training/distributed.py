"""Training beyond one machine with PyTorch's own engine (DESIGN §8): torchrun + DDP.

``torchrun --nproc_per_node N -m stablesynth.cli train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and joins the process group (gloo on CPUs,
NCCL on GPUs). Without those variables it returns a single-process context, so
every caller can use the same code path in both cases. With NCCL each rank owns the
GPU ``cuda:LOCAL_RANK``: :meth:`DistContext.wrap` moves the model there before wrapping
it, so DDP all-reduces the gradients on the GPU, and :func:`training_device` tells the
training loops to put their batches there too.

What the helpers guarantee:

- :func:`shard_indices` is DistributedSampler's scheme (shuffle with a seed and the
  epoch, pad to a multiple of the world size, rank r takes every world-th index
  starting at r), so with a per-rank batch b the union of the ranks' step-s batches
  is exactly the step-s batch of a single process with batch ``world × b``;
- :meth:`DistContext.all_reduce` sums (or averages) metrics across ranks;
- only rank 0 writes checkpoints and logs (:meth:`DistContext.log`), and a
  :meth:`DistContext.barrier` follows every write that other ranks then read.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stablesynth.accelerator import resolve_device

ENV_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The torchrun environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def log(self, log: Callable[[str], None] = print) -> Callable[[str], None]:
        """A logger that prints on rank 0 only (N copies of every line help nobody)."""
        if self.is_main:
            return log
        return lambda _msg: None

    def all_reduce(self, values: Mapping[str, float], op: str = "sum") -> dict[str, float]:
        """Sum (``op="sum"``) or average (``op="mean"``) scalar metrics over ranks."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        keys = sorted(values)
        if not self.enabled or not keys:
            return {k: float(values[k]) for k in keys}
        # float64 so that counts summed over ranks stay exact.
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= self.world_size
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def wrap(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``model`` under DistributedDataParallel when distributed, else ``model`` itself.

        On NCCL the model is first moved (in place) to this rank's GPU, so the gradients
        are all-reduced there.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.startswith("cuda"):
            model.to(self.device)
            return DistributedDataParallel(model, device_ids=[self.local_rank],
                                           find_unused_parameters=find_unused_parameters)
        return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


SINGLE = DistContext()


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def training_device(device: torch.device | str | None, ctx: DistContext | None = None) -> torch.device:
    """The device a training loop runs on: this rank's GPU under NCCL, else ``device`` (default CPU).

    Under torchrun each rank must use its own GPU whatever ``--device`` said, so an
    NCCL context wins; a spelling such as ``auto`` is resolved by
    :func:`~stablesynth.accelerator.resolve_device`.
    """
    if ctx is not None and ctx.enabled and ctx.device.startswith("cuda"):
        return torch.device(ctx.device)
    if device is None:
        return torch.device("cpu")
    return resolve_device(device)


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0,
                     device: torch.device | str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise. ``device``
    (``--device``) narrows that: ``cpu`` means gloo on CPUs even on a GPU machine, ``cuda``
    requires CUDA (NCCL, rank r on ``cuda:LOCAL_RANK``; an index is ignored, torchrun
    decides), ``auto``/None keeps the default. Returns :data:`SINGLE` when the variables
    are absent or ``WORLD_SIZE`` is 1.
    """
    wanted = None if device is None else resolve_device(device)
    if wanted is not None and backend is None:
        backend = "nccl" if wanted.type == "cuda" else "gloo"
    if not launched_by_torchrun():
        return SINGLE
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if world == 1:
        return SINGLE
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"distributed run lacks {', '.join(missing)} (start it with torchrun)")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = "cpu"
    if backend == "nccl":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise DistributedError(f"NCCL needs a GPU per local rank; LOCAL_RANK={local} but "
                                   f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=device)


def cleanup(ctx: DistContext | None = None) -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, rank: int, world_size: int, *, shuffle: bool = True, seed: int = 0,
                  epoch: int = 0, drop_last: bool = False) -> list[int]:
    """This rank's share of ``range(n)`` for one epoch, as DistributedSampler draws it.

    Every rank gets the same number of indices: the list is padded by repeating its
    start (or cut, with ``drop_last``) to a multiple of ``world_size``, so all ranks
    take the same number of steps and no all-reduce waits forever.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if drop_last:
        order = order[: (n // world_size) * world_size]
    elif order and len(order) % world_size:
        pad = world_size - len(order) % world_size
        order += (order * (pad // len(order) + 1))[:pad]
    return order[rank::world_size]
