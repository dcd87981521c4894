"""The method interface: each method a small class, registered by name.

A method owns its modules and its loss; the training loop (``training/stage2.py``)
owns the optimizer and the data, and calls :meth:`Method.update` once per batch.
Cloud and device halves are explicit so serving uses the same code:
``upload`` (device → cloud), ``adapt`` (cloud: upload → Θ_d), ``predict`` (device).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.config import MethodConfig
from stablesynth.models.device import StaticHead
from stablesynth.registry import Registry, UnknownNameError

METHODS: Registry[type[Method]] = Registry("method")

#: StableSynthNet's three modules, switched off by the baselines so comparisons isolate them.
MODULES_OFF: dict[str, Any] = {"contrastive": False, "variance": False, "templates": False}


class Method(nn.Module):
    """What the rest of the package knows of a method, it asks the class (never the name)."""

    name: ClassVar[str]
    #: The name tables and plots show.
    label: ClassVar[str]
    #: MethodConfig values that differ from the field defaults for this method.
    config_defaults: ClassVar[dict[str, Any]] = {}
    #: False for methods that generate nothing per upload (f_linear, fine_tune).
    adaptive: ClassVar[bool] = True
    #: False for methods whose stage 2 trains nothing (fine_tune: the stage-1 head as is).
    trains_in_stage2: ClassVar[bool] = True
    #: True when the method reads features of the untrained encoder, not stage 1's (f_linear).
    uses_untrained_encoder: ClassVar[bool] = False
    #: True when the upload is several frames (``duet_frames``), not one.
    multi_frame_upload: ClassVar[bool] = False
    #: True when the method needs K answer classes (a prior over answers): not for (clip, text) pair scores.
    needs_answer_classes: ClassVar[bool] = False
    #: True for the stage-1 global head: the reference of the oracle, the diagnostics and em-prior.
    is_global_head: ClassVar[bool] = False
    #: True when predictions use the session's earlier clips (``predict_stream``): the on-device corrections.
    session_causal: ClassVar[bool] = False
    #: The method whose stage 2 this one reuses as it is (a correction on top of its Θ_d), or None.
    stage2_of: ClassVar[str | None] = None
    #: True for the method this package proposes: the report's comparisons and the encoding study are about it.
    proposed: ClassVar[bool] = False
    cfg: MethodConfig
    #: The device's static MLP (192 → 96); every method has one.
    static: StaticHead

    def prepare(self, train: FeatureBatch, validation: FeatureBatch | None) -> None:
        """Before stage 2: statistics of the training clips, and choices made on the validation clips."""

    def predict_stream(self, session: FeatureBatch, per_session: bool = False) -> torch.Tensor:
        """Logits [n, K] of one session's clips in capture order, clip t using only clips before it;
        ``per_session``: Θ_d from the session's first upload for every clip (per-clip uploads otherwise)."""
        raise NotImplementedError(f"method {self.name!r} does not predict a session as a stream")

    def on_device(self) -> dict[str, Any] | None:
        """What the device does beyond the forward pass (its correction and chosen settings), or None."""
        return None

    def prepare_cost_count(self) -> None:
        """Put an untrained model in the state a trained one counts cloud FLOPs in (default: nothing)."""

    def init_from_head(self, static: StaticHead, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start from the stage-1 head: copy its static MLP (subclasses also take W, b)."""
        self.static.load_state_dict(static.state_dict())

    def driver(self, upload: torch.Tensor) -> torch.Tensor:
        """Cloud: the parametric driver d = f_p(upload) [B, d]; only adaptive methods have one."""
        raise NotImplementedError(f"method {self.name!r} has no parametric driver")

    def loss(self, batch: FeatureBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on one batch, and the scalars to log."""
        logits = self(batch)
        ce = nn.functional.cross_entropy(logits, batch.label, ignore_index=-100)
        return ce, {"ce": ce.item()}

    def after_step(self, batch: FeatureBatch) -> None:
        """Hook after the optimizer step (e.g. template updates, which are not gradient-trained)."""

    def update(self, batch: FeatureBatch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self.train()
        optimizer.zero_grad(set_to_none=True)
        loss, logs = self.loss(batch)
        loss.backward()
        optimizer.step()
        self.after_step(batch)
        return logs

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def upload(self, batch: FeatureBatch) -> torch.Tensor:
        """What the device sends: one frame, [B, 192] by default."""
        return batch.uploaded

    def adapt(self, upload: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cloud step: uploads [B, ...] → Θ_d as {name: [B, *shape]}."""
        raise NotImplementedError

    def predict(self, f_g: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Device step: logits from the clip feature F_g and Θ_d."""
        raise NotImplementedError

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        """Per-sample mode: every clip is predicted with Θ_d generated from its own upload."""
        return self.predict(batch.f_g, self.adapt(self.upload(batch)))


def default_method_config(name: str, **overrides: Any) -> MethodConfig:
    """The named method's default config, with ``overrides`` applied (validated)."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS.names()))})")
    return MethodConfig.from_dict({**METHODS.get(name).config_defaults, **overrides})
