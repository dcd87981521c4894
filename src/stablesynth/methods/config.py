"""MethodConfig: every hyper-parameter of every method, validated on load."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from stablesynth.config import Config


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
    rank: int = Field(4, ge=1)
    code_dim: int = Field(16, ge=1)
    driver_dim: int = Field(96, ge=1)
    projector_hidden: int = Field(96, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    duet_frames: int = Field(5, ge=1)
    # categories for the contrastive / variance / template modules
    category: Literal["answer", "question_type", "device"] = "answer"
    #: None: the number of classes (category = answer).
    num_categories: int | None = Field(None, ge=1)
    # Driver Contrastive Training (Eq. 5–6); the margin is an angle in radians.
    contrastive: bool = True
    margin: float = Field(0.1, ge=0, le=math.pi)
    temperature: float = Field(0.1, gt=0)
    contrastive_weight: float = Field(1.0, ge=0)
    # Offset-Driver Separation (Eq. 7–8)
    variance: bool = True
    lambda_irm: float = Field(0.1, ge=0)
    # Template-Driver Extraction (Eq. 9–12)
    templates: bool = True
    template_update: Literal["convex", "literal"] = "convex"
    beta: float = Field(0.9, ge=0, lt=1)
    gamma: float = Field(1.0, gt=0)
    lambda_f: float = Field(0.5, ge=0, le=1)
    fusion_direction: Literal["feature_pattern", "template_pattern"] = "feature_pattern"
    template_select: Literal["nearest", "soft"] = "nearest"
    select_temperature: float = Field(0.1, gt=0)
    #: Weight of the device-optimum term in a hypernetwork's stage-2 loss: the mean squared distance of
    #: each clip's generated Θ_d to its device's per-device last-layer optimum (``device_optima.device_ceilings``,
    #: fitted to convergence on that device's training history), over the mean squared distance of those optima to
    #: the global head. The target is the same for every clip of a device, so the term rewards a Θ_d
    #: that follows the camera rather than the clip's content. 0: off (the paper's loss).
    optimum_weight: float = Field(0.0, ge=0)
    #: What the optimum term pulls towards: each device's whole last layer (``last_layer``), or its
    #: per-device bias with W kept at the global head's (``bias``): K numbers per device instead of
    #: K × 97, the smaller thing to infer from one frame, and worth most of the headroom by itself.
    optimum_target: Literal["last_layer", "bias"] = "last_layer"
    # optimisation (stage 2)
    #: What stage 2 trains in a hypernetwork method: ``adaptation`` (the projector, the generator's
    #: modulating layers and the templates; the static head and the base Θ keep their stage-1 values)
    #: or ``all`` (every parameter, which mixes extra training of the head with adaptation).
    stage2_trains: Literal["adaptation", "all"] = "adaptation"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    epochs: int = Field(40, ge=0)
    batch_size: int = Field(256, ge=1)
