"""MethodConfig: every hyper-parameter of every method, validated on load."""

from __future__ import annotations

import math
from typing import Literal

from stablesynth.config import Config, require


class MethodConfig(Config):
    """Hyper-parameters of stage 2 and of the hypernetwork methods (DESIGN §3).

    ``fusion_direction`` says which vector supplies the *pattern* in Eq. 11:
    ``feature_pattern`` (default, AdaIN's meaning) keeps the uploaded feature's
    pattern with the template's mean/std, σ(P)·(F−μ(F))/σ(F) + μ(P);
    ``template_pattern`` is the paper prose's reading, the template's pattern
    with the feature's statistics, σ(F)·(P−μ(P))/σ(P) + μ(F).
    """

    # hypernetwork
    generator: Literal["full", "lowrank", "film"] = "film"
    rank: int = 4
    code_dim: int = 16
    driver_dim: int = 96
    projector_hidden: int = 96
    dropout: float = 0.5
    duet_frames: int = 5
    # categories for the contrastive / variance / template modules
    category: Literal["answer", "question_type", "device"] = "answer"
    num_categories: int | None = None  # None: the number of classes (category = answer)
    # Driver Contrastive Training (Eq. 5–6)
    contrastive: bool = True
    margin: float = 0.1
    temperature: float = 0.1
    contrastive_weight: float = 1.0
    # Offset-Driver Separation (Eq. 7–8)
    variance: bool = True
    lambda_irm: float = 0.1
    # Template-Driver Extraction (Eq. 9–12)
    templates: bool = True
    template_update: Literal["convex", "literal"] = "convex"
    beta: float = 0.9
    gamma: float = 1.0
    lambda_f: float = 0.5
    fusion_direction: Literal["feature_pattern", "template_pattern"] = "feature_pattern"
    template_select: Literal["nearest", "soft"] = "nearest"
    select_temperature: float = 0.1
    # optimisation (stage 2)
    #: What stage 2 trains in a hypernetwork method: ``adaptation`` (the projector, the generator's
    #: modulating layers and the templates; the static head and the base Θ keep their stage-1 values)
    #: or ``all`` (every parameter, which mixes extra training of the head with adaptation).
    stage2_trains: Literal["adaptation", "all"] = "adaptation"
    lr: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 40
    batch_size: int = 256

    def check(self) -> None:
        require(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        require(self.code_dim >= 1, "code_dim", f"must be >= 1, got {self.code_dim}")
        require(self.driver_dim >= 1, "driver_dim", f"must be >= 1, got {self.driver_dim}")
        require(self.projector_hidden >= 1, "projector_hidden", f"must be >= 1, got {self.projector_hidden}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.duet_frames >= 1, "duet_frames", f"must be >= 1, got {self.duet_frames}")
        require(self.num_categories is None or self.num_categories >= 1, "num_categories",
                f"must be >= 1 or null, got {self.num_categories}")
        require(0.0 <= self.margin <= math.pi, "margin", f"must be in [0, π] radians, got {self.margin}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.contrastive_weight >= 0, "contrastive_weight",
                f"must be >= 0, got {self.contrastive_weight}")
        require(self.lambda_irm >= 0, "lambda_irm", f"must be >= 0, got {self.lambda_irm}")
        require(0.0 <= self.beta < 1.0, "beta", f"must be in [0, 1), got {self.beta}")
        require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        require(0.0 <= self.lambda_f <= 1.0, "lambda_f", f"must be in [0, 1], got {self.lambda_f}")
        require(self.select_temperature > 0, "select_temperature",
                f"must be > 0, got {self.select_temperature}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
