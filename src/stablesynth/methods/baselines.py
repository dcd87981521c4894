"""Baselines (DESIGN §4): fine_tune, f_linear (one global head), f_hyper and duet (hypernetworks).

All start from the stage-1 head through ``init_from_head``. F-hyper uses the same
projector and the same generator as StableSynthNet (``MethodConfig.generator``,
default ``film``), so comparing the two isolates StableSynthNet's three modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.base import METHODS, MODULES_OFF, Method
from stablesynth.methods.config import MethodConfig
from stablesynth.methods.device_optima import LastLayer, device_ceilings
from stablesynth.models.device import FEATURE_DIM, HIDDEN_DIM, StaticHead, dynamic_linear, dynamic_specs
from stablesynth.models.generators import Generator, create_generator
from stablesynth.models.hypernet import MLPProjector, SequenceProjector


def _check_head(weight: torch.Tensor, bias: torch.Tensor, K: int) -> None:
    if tuple(weight.shape) != (K, HIDDEN_DIM) or tuple(bias.shape) != (K,):
        raise ValueError(f"head must be weight [{K}, {HIDDEN_DIM}] and bias [{K}], "
                         f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError("head weight/bias contain NaN or inf")


class _DeviceHeadMixin(Method):
    """The device half every method shares: logits = W_d · static(F_g) + b_d."""

    def predict(self, f_g: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if f_g.dim() != 2 or f_g.shape[1] != FEATURE_DIM:
            raise ValueError(f"f_g must be [B, {FEATURE_DIM}], got {tuple(f_g.shape)}")
        weight, bias = params["weight"], params["bias"]
        if weight.dim() == 3 and weight.shape[0] != f_g.shape[0]:
            raise ValueError(f"per-sample Θ_d for {weight.shape[0]} samples, but {f_g.shape[0]} clips")
        return dynamic_linear(self.static(f_g), weight, bias)


class _GlobalHead(_DeviceHeadMixin):
    """One W, b for every device: nothing is generated per upload."""

    adaptive: ClassVar[bool] = False
    config_defaults: ClassVar[dict[str, Any]] = dict(MODULES_OFF)

    def __init__(self, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.static = StaticHead(dropout=cfg.dropout)
        layer = nn.Linear(HIDDEN_DIM, num_classes)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def init_from_head(self, static: StaticHead, weight: torch.Tensor, bias: torch.Tensor) -> None:
        _check_head(weight, bias, self.num_classes)
        super().init_from_head(static, weight, bias)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)

    def adapt(self, upload: torch.Tensor) -> dict[str, torch.Tensor]:
        B = upload.shape[0]
        return {"weight": self.weight.expand(B, -1, -1), "bias": self.bias.expand(B, -1)}

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        # The shared W, b need no per-sample copy: one matmul for the batch.
        return self.predict(batch.f_g, {"weight": self.weight, "bias": self.bias})


@METHODS.register("f_linear")
class FLinear(_GlobalHead):
    """F-linear: the same head, trained in stage 2 on features of the untrained (frozen) encoder."""

    name: ClassVar[str] = "f_linear"
    label: ClassVar[str] = "F-linear"
    uses_untrained_encoder: ClassVar[bool] = True


@METHODS.register("fine_tune")
class FineTune(_GlobalHead):
    """Fine-tuning: the stage-1 global head (encoder + head trained in stage 1); stage 2 trains nothing."""

    name: ClassVar[str] = "fine_tune"
    label: ClassVar[str] = "Fine-tuning"
    trains_in_stage2: ClassVar[bool] = False
    is_global_head: ClassVar[bool] = True


class HyperMethod(_DeviceHeadMixin):
    """Projector f_p + generator f_h (Eq. 3): Θ_d = f_h(f_p(upload))."""

    projector: nn.Module
    generator: Generator

    def __init__(self, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.static = StaticHead(dropout=cfg.dropout)
        self.projector = self._make_projector(cfg)
        self.generator = create_generator(cfg.generator, dynamic_specs(num_classes), cfg.driver_dim,
                                          rank=cfg.rank, code_dim=cfg.code_dim)

    def _make_projector(self, cfg: MethodConfig) -> nn.Module:
        return MLPProjector(FEATURE_DIM, cfg.driver_dim, cfg.projector_hidden)

    def init_from_head(self, static: StaticHead, weight: torch.Tensor, bias: torch.Tensor) -> None:
        _check_head(weight, bias, self.num_classes)
        super().init_from_head(static, weight, bias)
        self.generator.reset_base({"weight": weight, "bias": bias})
        self._head = LastLayer(weight.detach().clone(), bias.detach().clone())

    def prepare(self, train: FeatureBatch, validation: FeatureBatch | None) -> None:
        """With ``optimum_weight`` > 0: each training device's last-layer optimum, or its bias optimum with
        ``optimum_target: bias`` (:meth:`optimum_term`'s target)."""
        super().prepare(train, validation)
        self._optima = None
        if self.cfg.optimum_weight <= 0:
            return
        head = getattr(self, "_head", None)
        if head is None:
            raise RuntimeError(f"{self.name}: optimum_weight needs init_from_head before prepare")
        optima = device_ceilings(self.static, train, head, seed=0, bias_only=self.cfg.optimum_target == "bias")
        ids = torch.tensor(sorted(optima))
        weight = torch.stack([optima[int(d)].weight for d in ids])
        bias = torch.stack([optima[int(d)].bias for d in ids])
        scale = torch.stack([((o.flat() - head.flat()) ** 2).sum() for o in optima.values()]).mean()
        self._optima = (ids, weight, bias, float(scale.clamp_min(1e-12)))

    def optimum_term(self, params: Mapping[str, torch.Tensor], device: torch.Tensor) -> torch.Tensor | None:
        """``optimum_weight`` · mean ‖Θ_d − Θ*_device‖² / mean ‖Θ* − Θ_global‖² over the batch's clips of
        training devices (``MethodConfig.optimum_weight``); None when the term is off."""
        optima = getattr(self, "_optima", None)
        if optima is None:
            return None
        ids, weight, bias, scale = optima
        dev = device.cpu()
        pos = torch.searchsorted(ids, dev).clamp(max=len(ids) - 1)
        sel = ids[pos] == dev
        if not bool(sel.any()):
            return params["weight"].sum() * 0.0
        target_w = weight[pos[sel]].to(params["weight"].device)
        target_b = bias[pos[sel]].to(params["bias"].device)
        sel = sel.to(params["weight"].device)
        dist = ((params["weight"][sel] - target_w) ** 2).sum((1, 2)) + ((params["bias"][sel] - target_b) ** 2).sum(1)
        return self.cfg.optimum_weight * dist.mean() / scale

    def loss(self, batch: FeatureBatch) -> tuple[torch.Tensor, dict[str, float]]:
        params = self.adapt(self.upload(batch))
        ce = nn.functional.cross_entropy(self.predict(batch.f_g, params), batch.label, ignore_index=-100)
        logs = {"ce": ce.item()}
        term = self.optimum_term(params, batch.device)
        if term is None:
            return ce, logs
        logs["optimum"] = term.item()
        total = ce + term
        logs["loss"] = total.item()
        return total, logs

    def driver(self, upload: torch.Tensor) -> torch.Tensor:
        return self.projector(upload)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Stage 2's parameters: with ``stage2_trains: adaptation`` the static head and base Θ stay fixed."""
        if self.cfg.stage2_trains == "all":
            return super().trainable_parameters()
        fixed = {f"generator.{n}" for n in self.generator.base_parameter_names}
        return (p for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith("static.") and n not in fixed)

    def adapt(self, upload: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.generator(self.driver(upload))


@METHODS.register("f_hyper")
class FHyper(HyperMethod):
    """F-hyper: the hypernetwork on the raw uploaded frame; cross-entropy only."""

    name: ClassVar[str] = "f_hyper"
    label: ClassVar[str] = "F-hyper"
    #: StableSynthNet's generator with its modules off.
    config_defaults: ClassVar[dict[str, Any]] = dict(MODULES_OFF)


@METHODS.register("duet")
class Duet(HyperMethod):
    """DUET: GRU + MLP over the clip's first ``duet_frames`` frames ([B, 5, 192] uploaded), full generator."""

    name: ClassVar[str] = "duet"
    label: ClassVar[str] = "DUET"
    #: DUET's own full linear generator.
    config_defaults: ClassVar[dict[str, Any]] = {**MODULES_OFF, "generator": "full"}
    multi_frame_upload: ClassVar[bool] = True

    def _make_projector(self, cfg: MethodConfig) -> nn.Module:
        return SequenceProjector(FEATURE_DIM, cfg.driver_dim, cfg.projector_hidden)

    def upload(self, batch: FeatureBatch) -> torch.Tensor:
        T = self.cfg.duet_frames
        if batch.frames.shape[1] < T:
            raise ValueError(f"duet uploads {T} frames but the clips have only {batch.frames.shape[1]}")
        return batch.frames[:, :T]
