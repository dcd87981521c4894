"""The batch that stage 2, evaluation and serving share: cached per-frame features of clips."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class FeatureBatch:
    """Clips as per-frame encoder features (the feature cache's rows).

    frames:       [B, N_f, 192] fused per-frame features F_m of each clip
    label:        [B] answer index (-100 = outside the vocabulary, ignored)
    category:     [B] category for contrastive / variance / template modules
    device:       [B] device id
    upload_index: [B] which frame of the clip the device uploads (F_m^i)
    global_index: [B, D] the D frames averaged into F_g
    """

    frames: torch.Tensor
    label: torch.Tensor
    category: torch.Tensor
    device: torch.Tensor
    upload_index: torch.Tensor
    global_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def f_g(self) -> torch.Tensor:
        """F_g: mean of the D sampled frames (paper §3.1)."""
        idx = self.global_index.unsqueeze(-1).expand(-1, -1, self.frames.shape[-1])
        return torch.gather(self.frames, 1, idx).mean(dim=1)

    @property
    def uploaded(self) -> torch.Tensor:
        """F_m^i: the one frame feature the device uploads, [B, 192]."""
        return self.frames[torch.arange(len(self), device=self.frames.device), self.upload_index]

    def index(self, idx: torch.Tensor | slice) -> FeatureBatch:
        return FeatureBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def cat(batches: list[FeatureBatch]) -> FeatureBatch:
        """The clips of every batch, in order (same frame count and D in each)."""
        return FeatureBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(FeatureBatch)})
