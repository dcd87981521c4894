"""Where tensors run: the ``--device`` option and what each device needs (CPU or CUDA).

Every command that runs a model takes ``--device auto|cpu|cuda[:N]``
(:func:`add_device_argument`); :func:`resolve_device` turns the spelling into a
:class:`torch.device` or one clear error. The rest are the few things a training or
inference loop does differently on a GPU:

- :func:`configure_backends`: cuDNN autotuning and TF32 matmuls on CUDA (no-op on CPU);
- :func:`autocast`: bf16 autocast on CUDA, a no-op context on CPU (CPU stays fp32, so
  CPU results are bit-identical to code that never heard of devices);
- :func:`to_device`: move a batch (tensor, mapping, sequence or dataclass of tensors);
  on CPU it returns the batch itself;
- :func:`dataloader_kwargs`: workers and pinned memory for a DataLoader, sized from the
  machine's cores (and the number of processes sharing it under torchrun).

Checkpoints stay device-independent: tensors are written from CPU and loaded on CPU,
then moved. This module imports only torch and the standard library, and torch only
when a function needs it, so a command line that adds ``--device`` builds without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto|cpu|cuda[:N]"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A ``--device`` value that is misspelt or names a device this machine does not have."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a torch.device.

    Raises :class:`DeviceError` (a ValueError, so the CLI prints one line) for a
    misspelling, for ``cuda`` on a machine without a usable CUDA device, and for an
    index beyond the devices present.
    """
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    m = _SPEC.match(text)
    if not m:
        raise DeviceError(f"--device {spec!r}: expected {DEVICE_CHOICES}")
    kind, index = m.group(1), m.group(2)
    if kind in ("auto", "cpu") and index is not None:
        raise DeviceError(f"--device {spec!r}: only cuda takes an index ({DEVICE_CHOICES})")
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        build = "this torch build has no CUDA" if not torch.version.cuda else "no CUDA device is visible"
        raise DeviceError(f"--device {spec}: {build} (torch {torch.__version__}); use --device cpu or auto")
    count = torch.cuda.device_count()
    i = int(index) if index is not None else torch.cuda.current_device()
    if i >= count:
        raise DeviceError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", i)


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> argparse.Action:
    """Add ``--device auto|cpu|cuda[:N]`` to ``parser`` (a string; resolve it with :func:`resolve_device`)."""
    return parser.add_argument(
        "--device", default=default, metavar="DEVICE",
        help=f"where models and batches run: {DEVICE_CHOICES} (default {default}; auto = CUDA when present)")


def is_cuda(device: torch.device | str) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def configure_backends(device: torch.device | str) -> None:
    """Per-process speed settings for ``device``: on CUDA, cuDNN autotuning and TF32 matmuls/convs.

    Fixed shapes (a training run's batches) let cuDNN pick its fastest kernels once; TF32
    speeds up the fp32 matmuls that bf16 autocast leaves in fp32. Nothing changes on CPU.
    """
    import torch

    if not is_cuda(device):
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    torch.cuda.set_device(torch.device(device))


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype used on ``device``: bf16 on CUDA GPUs that have it, None (fp32) elsewhere.

    GPUs without bf16 stay in fp32 (+TF32 where present): fp16 training would need loss scaling.
    """
    import torch

    if is_cuda(device) and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; a no-op context on CPU, on GPUs without bf16, or when disabled."""
    import torch

    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def precision_name(device: torch.device | str, enabled: bool = True) -> str:
    """``"bfloat16"`` under :func:`autocast`, else ``"float32"``."""
    import torch

    dtype = autocast_dtype(device) if enabled else None
    return str(dtype or torch.float32).replace("torch.", "")


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor in it on ``device`` (tensors, mappings, lists/tuples, dataclasses).

    On CPU with CPU tensors nothing is copied. ``non_blocking`` overlaps the copy with
    compute when the source is in pinned memory.
    """
    import torch

    device = torch.device(device)
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device, non_blocking)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def synchronize(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (for timing); no-op on CPU."""
    import torch

    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def cpu_count() -> int:
    """Cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def dataloader_kwargs(device: torch.device | str, *, decode: bool = True, workers: int | None = None,
                      max_workers: int = 8) -> dict[str, Any]:
    """DataLoader keyword arguments for batches bound for ``device``.

    ``decode=True`` (video decoding, image rendering) gives each process sharing this
    machine (``LOCAL_WORLD_SIZE`` under torchrun) an equal share of the cores, one kept
    for the training loop, at most ``max_workers``; ``decode=False`` (tensors already in
    memory) uses none. ``workers`` overrides the count. CUDA adds pinned memory so
    host→device copies can be asynchronous.
    """
    if workers is None:
        if decode:
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            workers = max(0, min(max_workers, cpu_count() // local - 1))
        else:
            workers = 0
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": is_cuda(device)}
    if workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = 4 if is_cuda(device) else 2
    return kwargs


def describe(device: torch.device | str) -> str:
    """A short name for reports: the GPU's name, or ``cpu (N cores)``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    return f"cpu ({cpu_count()} cores, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def inference(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """``torch.inference_mode`` plus :func:`autocast` for ``device``."""
    import torch

    with torch.inference_mode(), autocast(device, enabled):
        yield
