"""What the cloud serves: a method under a model id and version, and its checkpoints.

A method checkpoint (``kind="method"``, see :mod:`stablesynth.checkpoint`) holds the method's
state dict plus how to rebuild it (registry name, config, K). Loading validates the manifest
field by field, the weights' checksum and finiteness, and derives ``model_version`` from the
weights and config, so the version a device pins identifies exactly what it gets. Before
anything is allocated, the method the config describes is built without memory (PyTorch's
``meta`` device) and its size bounded (:data:`MAX_CHECKPOINT_ELEMENTS`); once loaded, every
tensor must have the module's dtype and every weight a magnitude of at most
:data:`MAX_WEIGHT_ABS`, so that a checkpoint that would start and then fail every upload
does not start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stablesynth import checkpoint
from stablesynth.checkpoint import METHOD_KIND, CheckpointError, check_safe_name
from stablesynth.cloud.framing import ScaledBase
from stablesynth.methods import build_method
from stablesynth.methods.base import Method
from stablesynth.methods.baselines import HyperMethod
from stablesynth_device.wire.protocol import ENCODINGS, PARAM_ENCODINGS

#: Most values (parameters and buffers) a served method may hold: 4 GiB of float32.
MAX_CHECKPOINT_ELEMENTS = 1 << 30
#: Largest |weight| a served method may hold: fp16's largest finite value, the narrowest range
#: of the reply encodings (Θ_d's base is sent as is in fp16; beyond it every reply would be refused).
MAX_WEIGHT_ABS = 65504.0

#: What is sent for uploads: ``{name: [B, *shape]}``.
Outputs = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Expansion:
    """What :meth:`CloudModel.compute_each` returns: ``expand(part, out=None)`` gives the outputs of
    the uploads ``part``; ``bounds[i]`` (float64, or ``None``) bounds every |value| upload ``i``'s
    outputs can take, known before they are expanded (NaN/Inf: no bound)."""

    expand: Callable[[slice, Outputs | None], Outputs]
    bounds: torch.Tensor | None = None
    #: Outputs of the form ``base ⊙ row colᵀ`` for the whole batch, as float32 arrays ``{name: (base
    #: [r, c], row [B, r], col [B, c])}`` (see Generator.scaled_bases); ``expand`` leaves out of ``out``
    #: whatever is not in it.
    scaled: Mapping[str, ScaledBase] = field(default_factory=dict)

    def __call__(self, part: slice, out: Outputs | None = None) -> Outputs:
        return self.expand(part, out)


@dataclass
class CloudModel:
    """A method served under ``model_id``/``version``; ``num_classes`` is K of its Θ_d."""

    method: Method
    model_id: str
    version: str
    num_classes: int
    #: How to rebuild the method elsewhere (device bundle): registry name, config dict.
    method_name: str = ""
    method_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_safe_name(self.model_id, "model id")
        check_safe_name(self.version, "model version")
        self.method.eval()
        if not self.method_name:
            self.method_name = getattr(self.method, "name", type(self.method).__name__)

    @property
    def device(self) -> torch.device:
        p = next(iter(self.method.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def encodings(self) -> tuple[str, ...]:
        if getattr(self.method, "generator", None) is None:
            return PARAM_ENCODINGS
        return ENCODINGS

    def compute(self, uploads: torch.Tensor, encoding: str) -> list[dict[str, torch.Tensor]]:
        """What to send for each upload in ``encoding`` (one method call for the whole batch)."""
        out = self.compute_batch(uploads, encoding)
        return [{k: v[i] for k, v in out.items()} for i in range(uploads.shape[0])]

    def compute_batch(self, uploads: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
        """:meth:`compute` as batched tensors ``{name: [B, *shape]}`` (on the model's device)."""
        device = self.device
        if uploads.device != device:
            uploads = uploads.to(device)
        with torch.inference_mode():
            if encoding in PARAM_ENCODINGS:
                out = self.method.adapt(uploads)
            elif encoding == "factors":
                out = self.method.generator.factors(self.method.driver(uploads))
            elif encoding == "driver":
                out = {"driver": self.method.driver(uploads)}
            else:
                raise ValueError(f"unknown encoding {encoding!r}")
        return out

    def expands_each(self, encoding: str) -> bool:
        """Whether :meth:`compute_each` expands Θ_d upload by upload (see there)."""
        return (encoding in PARAM_ENCODINGS and getattr(self.method, "generator", None) is not None
                and type(self.method).adapt is HyperMethod.adapt and self.device.type == "cpu")

    def compute_each(self, uploads: torch.Tensor, encoding: str) -> Expansion:
        """What to send for the uploads of ``part`` (a slice of the batch), as a function of ``part``
        (and optionally ``out``) giving ``{name: [n, *shape]}`` on the CPU; with ``out`` (float32
        tensors of :meth:`output_shapes`) the result is written into those tensors.

        Θ_d is large (582 KB per upload at K = 1501, 37 MB for a batch of 64): written out for a
        whole batch it leaves the CPU cache and costs fresh memory (page faults) before it is
        even encoded. So when :meth:`expands_each` (the Θ_d encodings of a generator method on
        the CPU), the driver and the generator's factors are computed for the whole batch, one
        call each, and the Θ_d of a few uploads is expanded only when asked for, straight into
        ``out`` (the reply frames themselves in fp32), to be encoded and checksummed while it is
        still in the cache. Otherwise this is :meth:`compute_batch`. Errors of the batched part
        are raised here, those of one part's expansion by its call. The generator's
        :meth:`~stablesynth.models.generators.Generator.magnitude_bound` comes along, so that
        the encoder can skip the checks a bounded Θ_d cannot fail.
        """
        if self.expands_each(encoding):
            gen = self.method.generator
            with torch.inference_mode():
                factors = gen.factors(self.method.driver(uploads.cpu()))
                bounds = gen.magnitude_bound(factors)
                scaled = {name: tuple(np.ascontiguousarray(t.numpy(), np.float32) for t in form)
                          for name, form in gen.scaled_bases(factors).items()}

            def expand(part: slice, out: Outputs | None = None) -> Outputs:
                with torch.inference_mode():
                    return gen.expand({k: v[part] for k, v in factors.items()}, out=out)

            return Expansion(expand, bounds, scaled)
        batch = {k: v.to("cpu") for k, v in self.compute_batch(uploads, encoding).items()}

        def select(part: slice, out: Outputs | None = None) -> Outputs:
            if out is None:
                return {k: v[part] for k, v in batch.items()}
            for k, v in batch.items():
                out[k].copy_(v[part])
            return dict(out)

        return Expansion(select)

    def output_shapes(self, encoding: str) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of what is sent for one upload in a Θ_d encoding (from the generator's specs)."""
        if encoding not in PARAM_ENCODINGS or getattr(self.method, "generator", None) is None:
            raise ValueError(f"output shapes are known for the Θ_d encodings of a generator method, not {encoding!r}")
        return {s.name: tuple(s.shape) for s in self.method.generator.specs}

    def describe(self) -> dict[str, Any]:
        gen = getattr(self.method, "generator", None)
        return {"id": self.model_id, "version": self.version, "num_classes": self.num_classes,
                "method": self.method_name, "generator": type(gen).__name__ if gen is not None else None,
                "encodings": list(self.encodings)}


def save_cloud_model(directory: str | Path, method: Method, model_id: str,
                     method_config: Mapping[str, Any] | None = None,
                     num_classes: int | None = None) -> Path:
    """Write a servable checkpoint of ``method``: its state dict plus how to rebuild it.

    ``method_config``/``num_classes`` default to the method's ``cfg``/``num_classes`` attributes.
    The checkpoint's ``model_version`` is computed from the weights and config.
    """
    check_safe_name(model_id, "model id")
    cfg_obj = getattr(method, "cfg", None)
    if method_config is None:
        if cfg_obj is None:
            raise ValueError("pass method_config: the method has no cfg attribute")
        method_config = cfg_obj.to_dict()
    k = num_classes if num_classes is not None else getattr(method, "num_classes", None)
    if k is None:
        raise ValueError("pass num_classes: the method has no num_classes attribute")
    manifest = {"method": method.name, "config": dict(method_config), "num_classes": int(k),
                "model_id": model_id}
    return checkpoint.save_module(directory, method, manifest, kind=METHOD_KIND)


def load_cloud_model(checkpoint_dir: str | Path, model_id: str | None = None, version: str | None = None,
                     device: torch.device | str | None = None) -> CloudModel:
    """Build the method named in the checkpoint manifest, load its verified weights (on the CPU),
    then move it to ``device``.

    The model id defaults to the manifest's ``model_id`` (else the directory name) and the
    version to the hash of weights and config (:func:`stablesynth.checkpoint.model_version`).
    """
    directory = Path(checkpoint_dir)
    manifest = checkpoint.read_method_manifest(directory)
    if manifest.kind != METHOD_KIND:
        raise CheckpointError(f"checkpoint {directory}: manifest field 'kind' is {manifest.kind!r}, "
                              f"expected {METHOD_KIND!r} (a method checkpoint)")
    _check_size(directory, manifest)
    method = _build(directory, manifest)
    checkpoint.load_module_state(directory, method)
    check_weight_magnitudes(directory, method)
    mid = check_safe_name(model_id or manifest.model_id or directory.name, "model id")
    ver = check_safe_name(version or str(manifest.model_version), "model version")
    if device is not None:
        method.to(device)
    return CloudModel(method, mid, ver, manifest.num_classes, manifest.method, dict(manifest.config))


def _build(directory: Path, manifest: checkpoint.MethodManifest) -> Method:
    try:
        return build_method(manifest.method, manifest.num_classes, manifest.config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {directory}: manifest field 'config' does not build method "
                              f"{manifest.method!r}: {exc}") from None


def _check_size(directory: Path, manifest: checkpoint.MethodManifest) -> None:
    """Refuse a config whose method would not fit, before allocating it (built on the meta device)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _build(directory, manifest).state_dict().items()}
    total = sum(s.numel() for s in shapes.values())
    if total > MAX_CHECKPOINT_ELEMENTS:
        name, shape = max(shapes.items(), key=lambda kv: kv[1].numel())
        raise CheckpointError(f"checkpoint {directory}: manifest fields 'config' and 'num_classes' describe a "
                              f"method of {total:,} values (largest: {name!r} {list(shape)}); at most "
                              f"{MAX_CHECKPOINT_ELEMENTS:,} are served")


def check_weight_magnitudes(directory: str | Path, method: Method) -> None:
    """CheckpointError naming the first floating tensor of ``method`` with a value beyond :data:`MAX_WEIGHT_ABS`."""
    with torch.no_grad():
        for name, t in method.state_dict().items():
            if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_WEIGHT_ABS:
                raise CheckpointError(f"checkpoint {directory}: tensor {name!r} holds |value| "
                                      f"{float(t.abs().max()):.3g}, beyond {MAX_WEIGHT_ABS:g} (the fp16 reply "
                                      "range): every reply would be refused")
