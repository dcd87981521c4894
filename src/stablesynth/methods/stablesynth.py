"""StableSynthNet (DESIGN §3): template fusion → f_p → driver → f_h, trained with CE + Eq. 5–8.

Cloud step for one upload F (no label anywhere):
  P = templates.select(F)                       nearest (or soft) template, label-free
  F' = adain_fuse(F, P, λ_f, direction)         Eq. 11–12
  d = f_p(F'),  Θ_d = f_h(d)                    Eq. 3
Training loss: CE + w_cl · mean ℓ_i (Eq. 5–6) + λ_irm · Σ_c (N_c/N) Var(ℓ | c) (Eq. 7–8),
where ℓ_i are the per-sample contrastive losses of the drivers grouped by ``batch.category``.
After each optimizer step the templates move towards the batch's per-category mean
uploaded feature (Eq. 9–10). With every module switched off this is exactly F-hyper.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.base import METHODS
from stablesynth.methods.baselines import HyperMethod
from stablesynth.methods.config import MethodConfig
from stablesynth.methods.losses import driver_contrastive_loss, variance_penalty
from stablesynth.methods.templates import TemplateBank, adain_fuse
from stablesynth.models.device import FEATURE_DIM


@METHODS.register("stablesynth")
class StableSynthNet(HyperMethod):
    name: ClassVar[str] = "stablesynth"
    label: ClassVar[str] = "StableSynthNet"
    proposed: ClassVar[bool] = True

    def __init__(self, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        num_categories = cfg.num_categories if cfg.num_categories is not None else num_classes
        self.templates = TemplateBank(num_categories, FEATURE_DIM, cfg.beta, cfg.gamma, cfg.template_update)

    def prepare_cost_count(self) -> None:
        # A trained model has every template; an empty bank would skip the selection and under-count.
        if self.cfg.templates:
            with torch.no_grad():
                self.templates.P.normal_()
                self.templates.initialised.fill_(True)

    def fuse(self, upload: torch.Tensor) -> torch.Tensor:
        """F' (Eq. 11–12), the template chosen from the upload alone; F itself while no template exists."""
        if not self.cfg.templates:
            return upload
        chosen, has = self.templates.select(upload, self.cfg.template_select, self.cfg.select_temperature)
        if not bool(has.any()):
            return upload
        fused = adain_fuse(upload, chosen, self.cfg.lambda_f, self.cfg.fusion_direction)
        return torch.where(has.unsqueeze(1), fused, upload)

    def driver(self, upload: torch.Tensor) -> torch.Tensor:
        return self.projector(self.fuse(upload))

    def loss(self, batch: FeatureBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        d = self.driver(self.upload(batch))
        params = self.generator(d)
        logits = self.predict(batch.f_g, params)
        ce = nn.functional.cross_entropy(logits, batch.label, ignore_index=-100)
        total = ce
        logs = {"ce": ce.item()}
        if (term := self.optimum_term(params, batch.device)) is not None:
            total = total + term
            logs["optimum"] = term.item()
        if cfg.contrastive or cfg.variance:
            # The variance penalty acts on the contrastive ℓ_i, so they are computed for either module.
            cl, per_sample, valid = driver_contrastive_loss(d, batch.category, cfg.margin, cfg.temperature)
            if cfg.contrastive:
                total = total + cfg.contrastive_weight * cl
                logs["contrastive"] = cl.item()
            if cfg.variance:
                var = variance_penalty(per_sample, batch.category, valid)
                total = total + cfg.lambda_irm * var
                logs["variance"] = var.item()
        logs["loss"] = total.item()
        return total, logs

    def after_step(self, batch: FeatureBatch) -> None:
        if self.cfg.templates:
            self.templates.update(self.upload(batch).detach(), batch.category)
