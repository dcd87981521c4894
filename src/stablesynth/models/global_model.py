"""The global model: the multimodal encoder and the device head with a static last layer (Eq. 4).

Stage 1 trains it (the Fine-tuning baseline); the device ships its encoder and static head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from stablesynth.models.device import HIDDEN_DIM, StaticHead


def encode_frames(encoder: nn.Module, frames: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-frame features F_m [B, F, 192], each frame encoded on its own with the question.

    Frames go through the encoder one position at a time so that a frame's feature does
    not depend on where in the clip it sits: the device uploads any one frame, and the
    cloud must read it the same way whichever it is.
    """
    b, f = frames.shape[:2]
    flat = frames.reshape(b * f, 1, *frames.shape[2:])
    ids = input_ids.repeat_interleave(f, dim=0)
    mask = attention_mask.repeat_interleave(f, dim=0)
    return encoder(flat, ids, mask).reshape(b, f, -1)


class GlobalModel(nn.Module):
    """Encoder + device head with static last layer: the cloud model of the Fine-tuning baseline."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = encoder
        self.static = StaticHead(encoder.feature_dim, HIDDEN_DIM, dropout)
        self.classifier = nn.Linear(HIDDEN_DIM, num_classes)

    def clip_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """F_g: mean of the encoder features of the clip's D sampled frames."""
        frames = batch["frames"]
        idx = batch["global_index"]
        b = torch.arange(frames.shape[0], device=frames.device).unsqueeze(1)
        chosen = frames[b, idx]
        return encode_frames(self.encoder, chosen, batch["input_ids"], batch["attention_mask"]).mean(dim=1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.static(self.clip_features(batch)))
