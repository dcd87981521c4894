"""On-device baselines and combinations: a deployed head plus a correction the device runs alone.

``em_prior``, ``label_shift``, ``t3a`` and ``tent_sar`` are the stage-1 global head (Fine-tuning)
followed by one of :mod:`stablesynth.methods.corrections` on the device, with no upload at all.
``stablesynth_then_<correction>`` is what a practitioner would deploy: StableSynthNet's Θ_d from the
cloud, then the same correction on the device. Those reuse StableSynthNet's stage 2 (``stage2_of``)
and only fit their correction on the validation clips.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.base import METHODS, Method
from stablesynth.methods.baselines import FineTune
from stablesynth.methods.config import MethodConfig
from stablesynth.methods.corrections import (
    T3A,
    Correction,
    EMPriorCorrection,
    OnlineLabelShift,
    TentSAR,
    choose,
)
from stablesynth.methods.stablesynth import StableSynthNet
from stablesynth.models.device import dynamic_linear


class OnDeviceMixin(Method):
    """A method whose device corrects the head over its own session (``session_causal``)."""

    correction_cls: ClassVar[type[Correction]]
    session_causal: ClassVar[bool] = True
    needs_answer_classes: ClassVar[bool] = True
    is_global_head: ClassVar[bool] = False
    proposed: ClassVar[bool] = False
    correction: Correction
    num_classes: int

    def __init__(self, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)  # type: ignore[call-arg]
        self.correction = self.correction_cls(num_classes)

    def session_theta(self, session: FeatureBatch, per_session: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Θ_d per clip of one session: weight [n, K, H], bias [n, K] (the deployed head's, or the cloud's)."""
        n = len(session)
        if not self.adaptive:
            return self.weight.detach().expand(n, -1, -1), self.bias.detach().expand(n, -1)  # type: ignore[attr-defined]
        with torch.no_grad():
            source = session.index(slice(0, 1)) if per_session else session
            theta = self.adapt(self.upload(source))
        weight, bias = theta["weight"].detach(), theta["bias"].detach()
        if per_session:
            weight, bias = weight.expand(n, -1, -1), bias.expand(n, -1)
        return weight, bias

    def prepare(self, train: FeatureBatch, validation: FeatureBatch | None) -> None:
        """π_train from ``train``; the confusion matrix and the grid's choice on ``validation``'s sessions."""
        was_training = self.training
        self.eval()
        calib = validation if validation is not None and len(validation) else train
        weight, bias = self.session_theta(calib)
        with torch.no_grad():
            logits = dynamic_linear(self.static(calib.f_g), weight, bias)
        self.correction.fit(logits, calib.label, train.label)
        if calib is validation:
            # Per-sample Θ_d of a clip is its own: the sessions slice the Θ_d generated above.
            sessions = []
            for d in validation.device.unique().tolist():
                idx = torch.nonzero(validation.device == d).flatten()
                sessions.append((self.static, validation.f_g[idx], weight[idx], bias[idx], validation.label[idx]))
            self.validation_accuracy = choose(self.correction, sessions)
        self.train(was_training)

    def on_device(self) -> dict[str, Any]:
        return {"correction": self.correction.name, "label": self.correction.label,
                "backprop": self.correction.backprop, "hyper": self.correction.hyper(),
                "validation_accuracy": getattr(self, "validation_accuracy", None)}

    def predict_stream(self, session: FeatureBatch, per_session: bool = False) -> torch.Tensor:
        was_training = self.training
        self.eval()
        weight, bias = self.session_theta(session, per_session)
        out = self.correction.stream(self.static, session.f_g, weight, bias)
        self.train(was_training)
        return out


@METHODS.register("em_prior")
class EMPrior(OnDeviceMixin, FineTune):
    """The stage-1 global head, re-weighted on the device by an EM estimate of the session's answer prior."""

    name: ClassVar[str] = "em_prior"
    label: ClassVar[str] = "EM prior (on device)"
    correction_cls: ClassVar[type[Correction]] = EMPriorCorrection


@METHODS.register("label_shift")
class LabelShift(OnDeviceMixin, FineTune):
    """The stage-1 global head, re-weighted on the device by the online label-shift estimate."""

    name: ClassVar[str] = "label_shift"
    label: ClassVar[str] = "online label shift (on device)"
    correction_cls: ClassVar[type[Correction]] = OnlineLabelShift


@METHODS.register("t3a")
class T3AHead(OnDeviceMixin, FineTune):
    """The stage-1 global head's last layer replaced on the device by T3A's session prototypes."""

    name: ClassVar[str] = "t3a"
    label: ClassVar[str] = "T3A (on device)"
    correction_cls: ClassVar[type[Correction]] = T3A


@METHODS.register("tent_sar")
class TentSARHead(OnDeviceMixin, FineTune):
    """The stage-1 global head with its LayerNorm adapted on the device by TENT with SAR's safeguards."""

    name: ClassVar[str] = "tent_sar"
    label: ClassVar[str] = "TENT + SAR (on device)"
    correction_cls: ClassVar[type[Correction]] = TentSAR


class _AfterStableSynth(OnDeviceMixin, StableSynthNet):
    """StableSynthNet's Θ_d from the cloud, then a correction on the device; StableSynthNet's stage 2 reused."""

    stage2_of: ClassVar[str | None] = StableSynthNet.name


@METHODS.register("stablesynth_then_em_prior")
class StableSynthThenEMPrior(_AfterStableSynth):
    name: ClassVar[str] = "stablesynth_then_em_prior"
    label: ClassVar[str] = "StableSynthNet → EM prior"
    correction_cls: ClassVar[type[Correction]] = EMPriorCorrection


@METHODS.register("stablesynth_then_label_shift")
class StableSynthThenLabelShift(_AfterStableSynth):
    name: ClassVar[str] = "stablesynth_then_label_shift"
    label: ClassVar[str] = "StableSynthNet → online label shift"
    correction_cls: ClassVar[type[Correction]] = OnlineLabelShift


@METHODS.register("stablesynth_then_t3a")
class StableSynthThenT3A(_AfterStableSynth):
    name: ClassVar[str] = "stablesynth_then_t3a"
    label: ClassVar[str] = "StableSynthNet → T3A"
    correction_cls: ClassVar[type[Correction]] = T3A


@METHODS.register("stablesynth_then_tent_sar")
class StableSynthThenTentSAR(_AfterStableSynth):
    name: ClassVar[str] = "stablesynth_then_tent_sar"
    label: ClassVar[str] = "StableSynthNet → TENT + SAR"
    correction_cls: ClassVar[type[Correction]] = TentSAR
