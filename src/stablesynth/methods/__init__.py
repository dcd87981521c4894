"""Methods: one small class per method, registered by name in ``METHODS``.

Importing this package registers every method: fine_tune, f_linear, f_hyper, duet, stablesynth.
"""

from stablesynth.methods import baselines, stablesynth
from stablesynth.methods.base import METHODS, Method
from stablesynth.methods.config import MethodConfig, default_method_config


def create_method(name: str, num_classes: int, cfg: MethodConfig | None = None) -> Method:
    """Build a registered method; ``cfg`` defaults to :func:`default_method_config` for ``name``."""
    return METHODS.get(name)(cfg if cfg is not None else default_method_config(name), num_classes)


__all__ = ["METHODS", "Method", "MethodConfig", "baselines", "create_method", "default_method_config",
           "stablesynth"]
