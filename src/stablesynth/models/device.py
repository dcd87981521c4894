"""The device model M_d: a static MLP deployed once plus one dynamic linear layer.

The dynamic layer's parameter shapes are declared here, once (:func:`dynamic_specs`);
generators, the wire protocol and the ONNX export are all built from that declaration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

FEATURE_DIM = 192
HIDDEN_DIM = 96


@dataclass(frozen=True)
class ParamSpec:
    """Name and shape of one generated tensor (without the batch dimension)."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def dynamic_specs(num_classes: int, hidden_dim: int = HIDDEN_DIM) -> tuple[ParamSpec, ParamSpec]:
    """Θ_d of Eq. 3: the weight (K × hidden) and bias (K) of the device's last layer."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return ParamSpec("weight", (num_classes, hidden_dim)), ParamSpec("bias", (num_classes,))


def total_numel(specs: Sequence[ParamSpec]) -> int:
    return sum(s.numel for s in specs)


class StaticHead(nn.Module):
    """All-in-One's QA head up to its last layer: Dropout, Linear(192, 96), LayerNorm, GELU."""

    def __init__(self, feature_dim: int = FEATURE_DIM, hidden_dim: int = HIDDEN_DIM, dropout: float = 0.5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.act = nn.GELU()

    def forward(self, f_g: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.fc(self.dropout(f_g))))


def dynamic_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits = W_d h + b_d, for one shared Θ_d (W: K×H) or one per sample (W: B×K×H)."""
    if weight.dim() == 2:
        return h @ weight.T + bias
    return torch.einsum("bh,bkh->bk", h, weight) + bias


class DeviceModel(nn.Module):
    """M_d(F_g; Θ_d) of Eq. 4: static MLP on the clip feature F_g, then the dynamic layer."""

    def __init__(self, num_classes: int, feature_dim: int = FEATURE_DIM, hidden_dim: int = HIDDEN_DIM,
                 dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.static = StaticHead(feature_dim, hidden_dim, dropout)
        self.specs = dynamic_specs(num_classes, hidden_dim)

    def forward(self, f_g: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dynamic_linear(self.static(f_g), params["weight"], params["bias"])
