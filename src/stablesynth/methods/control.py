"""The stage-2 control: the hypernetwork recipe with adaptation switched off.

It is F-hyper whose projector always sees the same (zero) upload, so it generates one Θ
for every device. It trains exactly what F-hyper's stage 2 trains (``stage2_trains``) with
the same loss, batches and epochs; the difference between F-hyper and this row is what
adaptation to the upload adds, separated from what extra training of the head adds.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from stablesynth.methods.base import METHODS
from stablesynth.methods.baselines import FHyper


@METHODS.register("stage2_control")
class Stage2Control(FHyper):
    name: ClassVar[str] = "stage2_control"
    label: ClassVar[str] = "Stage-2 control (no adaptation)"
    adaptive: ClassVar[bool] = False

    def driver(self, upload: torch.Tensor) -> torch.Tensor:
        return self.projector(torch.zeros_like(upload))
