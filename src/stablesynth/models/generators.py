"""Generators f_h: the driver d → the device's dynamic parameters Θ_d (Eq. 3).

Generators are told the target shapes (a sequence of :class:`ParamSpec`); none is
hand-wired to the device model. Registry names: ``full``, ``lowrank``, ``film``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from stablesynth.models.device import ParamSpec
from stablesynth.registry import Registry

GENERATORS: Registry[type[Generator]] = Registry("generator")


class Generator(nn.Module):
    """Base: ``forward(driver [B, d]) -> {spec.name: [B, *spec.shape]}``.

    ``factors``/``expand`` split the map into what the cloud sends and what the
    device computes from tensors it caches once (``shared``); for ``full`` the
    factors are Θ_d itself and nothing is shared.
    """

    def __init__(self, specs: Sequence[ParamSpec], driver_dim: int,
                 init: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.driver_dim = driver_dim

    def forward(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.expand(self.factors(driver))

    def factors(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def expand(self, factors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def shared(self) -> dict[str, torch.Tensor]:
        return {}


def create_generator(name: str, specs: Sequence[ParamSpec], driver_dim: int, **kwargs) -> Generator:
    return GENERATORS.get(name)(specs, driver_dim, **kwargs)
