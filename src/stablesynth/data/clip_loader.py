"""Clip loaders over the benchmark: a dataset of row indices whose collate renders a whole batch.

Rendering in the collate lets one batch go through the capture pipeline as one tensor op,
and a clip's pixels come from its own seed, so they do not depend on the batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from stablesynth.data.benchmark import DeviceBenchmark


class ClipDataset(Dataset):
    """Clips of one split (optionally some devices); items are row indices, the collate renders.

    Rendering in the collate lets one batch go through the capture pipeline as one tensor op.
    """

    def __init__(
        self,
        benchmark: DeviceBenchmark,
        split: str,
        devices: Sequence[int] | str | None = None,
        clean: bool = False,
        attributes: bool = False,
    ) -> None:
        self.benchmark = benchmark
        self.split = split
        self.clean = clean
        self.attributes = attributes
        self.rows = benchmark.rows(split, devices)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return self.benchmark.batch(self.split, torch.tensor(rows, dtype=torch.long), clean=self.clean,
                                    attributes=self.attributes)


def make_loader(
    benchmark: DeviceBenchmark,
    split: str = "history",
    devices: Sequence[int] | str | None = None,
    batch_size: int = 64,
    shuffle: bool = False,
    clean: bool = False,
    num_workers: int = 0,
    seed: int | None = None,
    drop_last: bool = False,
    attributes: bool = False,
) -> DataLoader:
    """A DataLoader of dict batches (:data:`BATCH_KEYS`).

    ``devices``: ids, or 'seen' / 'unseen' / 'all' (None). Shuffling draws from ``seed``
    (default: the benchmark seed), so two loaders made alike yield the same order.
    ``clean=True`` renders through the identity profile (the no-shift reference).
    ``attributes=True`` adds each scene's ``color`` and ``shape`` (stage 1's auxiliary targets).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = ClipDataset(benchmark, split, devices, clean, attributes)
    if len(ds) == 0:
        raise ValueError(f"no clips in split {split!r} for devices {devices!r}")
    generator = None
    if shuffle:
        generator = torch.Generator().manual_seed(benchmark.cfg.seed if seed is None else seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=ds.collate,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
    )
