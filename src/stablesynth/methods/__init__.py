"""Methods: one small class per method, registered by name in ``METHODS``.

Importing this package registers every method: f_linear, fine_tune, f_hyper, duet, stablesynth, the
stage-2 control, the on-device baselines (em_prior, label_shift, t3a, tent_sar) and StableSynthNet
followed by each of them (stablesynth_then_*).
"""

from collections.abc import Mapping
from typing import Any

from stablesynth.methods import baselines, control, corrections, ondevice, stablesynth
from stablesynth.methods.base import METHODS, Method, default_method_config
from stablesynth.methods.config import MethodConfig


def build_method(name: str, num_classes: int, cfg: MethodConfig | Mapping[str, Any] | None = None,
                 cls: type[Method] | None = None) -> Method:
    """The one way to construct a registered method.

    ``cfg`` is a :class:`MethodConfig`, a plain dict (a checkpoint manifest's ``config``) or
    ``None`` for the method's defaults; ``cls`` a subclass of the registered class to build
    instead (a task's variant with the same parameters, e.g. pair scoring).
    """
    cls = cls or METHODS.get(name)
    if cfg is None:
        cfg = default_method_config(name)
    elif not isinstance(cfg, MethodConfig):
        cfg = MethodConfig.from_dict(dict(cfg))
    return cls(cfg, num_classes)


__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "baselines",
    "build_method",
    "control",
    "corrections",
    "default_method_config",
    "ondevice",
    "stablesynth",
]
