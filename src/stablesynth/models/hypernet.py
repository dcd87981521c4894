"""Projectors f_p (Eq. 3): the uploaded feature(s) → the parametric driver d.

``MLPProjector`` maps one 192-d frame feature (StableSynthNet, F-hyper).
``SequenceProjector`` is DUET's input side (HelloZicky/DUET ``HyperNetwork_FC``):
a GRU over the uploaded frame sequence, its last state through an MLP with Tanh
to the condition vector z. DUET keeps its generator matrices in Python lists, so
they never train and are never saved; here the generator is a registered
module (``models.generators.FullGenerator``) and trains end to end.
"""

from __future__ import annotations

import torch
from torch import nn

from stablesynth.models.device import FEATURE_DIM, HIDDEN_DIM


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")


class MLPProjector(nn.Module):
    """f_p for one frame: Linear(in, hidden) → GELU → Linear(hidden, driver_dim)."""

    def __init__(self, in_dim: int = FEATURE_DIM, driver_dim: int = HIDDEN_DIM,
                 hidden: int = HIDDEN_DIM) -> None:
        super().__init__()
        if min(in_dim, driver_dim, hidden) < 1:
            raise ValueError(f"sizes must be >= 1, got in_dim={in_dim}, driver_dim={driver_dim}, "
                             f"hidden={hidden}")
        self.in_dim = in_dim
        self.driver_dim = driver_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, driver_dim))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.dim() != 2 or feature.shape[1] != self.in_dim:
            raise ValueError(f"MLPProjector expects [B, {self.in_dim}], got {tuple(feature.shape)}")
        _check_finite(feature, "uploaded feature")
        return self.net(feature)


class SequenceProjector(nn.Module):
    """DUET's f_p: GRU over [B, T, in] → last hidden state → (Linear, Tanh)×(layers−1) → Linear → z."""

    def __init__(self, in_dim: int = FEATURE_DIM, driver_dim: int = HIDDEN_DIM, hidden: int = HIDDEN_DIM,
                 mlp_layers: int = 2) -> None:
        super().__init__()
        if min(in_dim, driver_dim, hidden, mlp_layers) < 1:
            raise ValueError("SequenceProjector sizes and mlp_layers must be >= 1")
        self.in_dim = in_dim
        self.driver_dim = driver_dim
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)
        layers: list[nn.Module] = []
        for _ in range(mlp_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        layers.append(nn.Linear(hidden, driver_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 3 or frames.shape[2] != self.in_dim or frames.shape[1] < 1:
            raise ValueError(f"SequenceProjector expects [B, T>=1, {self.in_dim}], got {tuple(frames.shape)}")
        _check_finite(frames, "uploaded frames")
        states, _ = self.gru(frames)
        return self.mlp(states[:, -1])
