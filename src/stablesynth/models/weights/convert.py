"""Applying a layout for one encoder preset: map, merge, resample, check, then write.

:func:`convert` turns a :class:`~stablesynth.models.weights.reading.SourceCheckpoint` into the
encoder's own keys for a preset's architecture (any object with the fields of
:class:`~stablesynth.models.vit.ViTSpec`, e.g. an ``EncoderConfig``). Every target's shape is
checked against the preset's own network (built on the meta device: nothing is allocated), every
tensor that goes in must be finite, and the architecture the source's config states (heads,
width, depth, activation) must be the preset's. Nothing is written until all of it has passed;
:func:`write_conversion` then writes the safetensors file and a JSON manifest beside it, each
atomically. :func:`load_into` is what ``encoder_overrides.vision_weights`` runs when a model is
built: it reads a converted file (or, as before, a timm/DeiT state dict) into the encoder.

A converted file's header metadata says what the encoder must be for it (``layer_norm_eps``,
``num_heads``: what the shapes do not show), so a config that does not match is refused rather
than silently computing something else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablesynth.files import atomic_write_bytes, atomic_write_json, sha256_file
from stablesynth.models.vit import VIDEO_TYPE, MultimodalEncoder
from stablesynth.models.weights.errors import WeightLoadError
from stablesynth.models.weights.layouts import TIMM, VISION_PREFIXES, Layout, Rule, fill, source_config
from stablesynth.models.weights.reading import SourceCheckpoint, read_checkpoint
from stablesynth.models.weights.resample import resize_pos_embed

FORMAT = "stablesynth-encoder-weights"
FORMAT_VERSION = "1"


def manifest_path(weights: str | Path) -> Path:
    """The JSON manifest beside a converted file (``FILE.safetensors`` → ``FILE.json``)."""
    return Path(weights).with_suffix(".json")


def target_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter of the encoder ``spec`` describes, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = MultimodalEncoder(spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclasses.dataclass
class _Context:
    """What an operation may know beside its input tensors."""

    names: list[str]
    shape: tuple[int, ...]
    flag: bool
    source: str


def _copy(values: list[torch.Tensor], ctx: _Context) -> tuple[torch.Tensor, str]:
    return values[0], ""


def _concat(values: list[torch.Tensor], ctx: _Context) -> tuple[torch.Tensor, str]:
    shapes = {tuple(v.shape[1:]) for v in values}
    if len(shapes) != 1:
        raise WeightLoadError(f"{ctx.source}: {', '.join(map(repr, ctx.names))} do not stack: shapes "
                              f"{[list(v.shape) for v in values]}")
    return torch.cat(values, dim=0), f"{' + '.join(n.rsplit('.', 2)[-2] for n in ctx.names)} stacked"


def _pos_embed(values: list[torch.Tensor], ctx: _Context) -> tuple[torch.Tensor, str]:
    pos = values[0]
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[-1] != ctx.shape[-1]:
        raise WeightLoadError(f"{ctx.source}: key {ctx.names[0]!r} has shape {list(pos.shape)}, a position "
                              f"embedding [1, tokens, {ctx.shape[-1]}] is expected")
    notes = []
    if ctx.flag:  # [cls, dist, grid] -> [cls, grid]
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        notes.append("the distillation token's row removed")
    old, new = pos.shape[1] - 1, ctx.shape[1] - 1
    if old != new:
        pos = resize_pos_embed(pos, new)
        a, b = math.isqrt(old), math.isqrt(new)
        notes.append(f"resampled from a {a}×{a} grid to {b}×{b}")
    return pos, "; ".join(notes)


def _add_video_type(values: list[torch.Tensor], ctx: _Context) -> tuple[torch.Tensor, str]:
    cls, types = values
    if types.dim() != 2 or types.shape[0] <= VIDEO_TYPE or types.shape[1] != cls.shape[-1]:
        raise WeightLoadError(f"{ctx.source}: key {ctx.names[1]!r} has shape {list(types.shape)}, "
                              f"[2, {cls.shape[-1]}] is expected")
    return cls + types[VIDEO_TYPE].reshape(1, 1, -1), f"plus {ctx.names[1]}[{VIDEO_TYPE}] (the video token type)"


def _text_positions(values: list[torch.Tensor], ctx: _Context) -> tuple[torch.Tensor, str]:
    pos, segments = values
    rows = ctx.shape[0]
    if pos.dim() != 2 or segments.dim() != 2 or segments.shape[1] != pos.shape[1]:
        raise WeightLoadError(f"{ctx.source}: keys {ctx.names[0]!r} {list(pos.shape)} and {ctx.names[1]!r} "
                              f"{list(segments.shape)} are not BERT's position and segment tables")
    if pos.shape[0] < rows:
        raise WeightLoadError(f"{ctx.source}: key {ctx.names[0]!r} has {pos.shape[0]} rows, the preset's "
                              f"max_text_len is {rows}: set max_text_len: {pos.shape[0]} or less")
    note = f"rows 0..{rows - 1} of {pos.shape[0]}, plus {ctx.names[1]}[0] (segment 0)"
    return pos[:rows] + segments[0], note


def _temporal(values: list[torch.Tensor], ctx: _Context) -> tuple[torch.Tensor, str]:
    t = values[0]
    if t.dim() != 3 or t.shape[0] != 1 or t.shape[-1] != ctx.shape[-1]:
        raise WeightLoadError(f"{ctx.source}: key {ctx.names[0]!r} has shape {list(t.shape)}, "
                              f"[1, frames, {ctx.shape[-1]}] is expected")
    frames, want = t.shape[1], ctx.shape[1]
    if frames >= want:
        return t[:, :want], (f"frames 0..{want - 1} of {frames}" if frames > want else "")
    pad = torch.zeros(1, want - frames, t.shape[-1], dtype=t.dtype)
    return torch.cat([t, pad], dim=1), f"{frames} frames, padded with zeros to max_frames={want}"


#: The operations a layout's rows name.
OPS: dict[str, Callable[[list[torch.Tensor], _Context], tuple[torch.Tensor, str]]] = {
    "copy": _copy, "concat": _concat, "pos_embed": _pos_embed, "add_video_type": _add_video_type,
    "text_positions": _text_positions, "temporal": _temporal,
}


@dataclasses.dataclass
class Conversion:
    """A source checkpoint in the encoder's layout for one preset, checked and ready to write."""

    layout: str
    preset: str
    source: SourceCheckpoint
    #: Encoder key → tensor (float32, contiguous, owning its memory).
    tensors: dict[str, torch.Tensor]
    #: Encoder key → the source keys (as the file spells them) it was made from.
    origins: dict[str, list[str]]
    #: Encoder key → what was done beyond a copy.
    notes: dict[str, str]
    #: Source key → why it has no place in the encoder.
    dropped: dict[str, str]
    #: Encoder keys the file does not set → why (the model keeps its own).
    left: dict[str, str]
    layer_norm_eps: float
    num_heads: int
    #: The ``encoder_overrides`` beyond the preset that the file needs (e.g. Hugging Face's layer_norm_eps).
    overrides: dict[str, Any]
    #: What could not be checked from the source.
    assumptions: list[str]

    def file_metadata(self) -> dict[str, str]:
        """The safetensors header: what the encoder must be for this file."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": self.layout, "preset": self.preset,
                "layer_norm_eps": repr(self.layer_norm_eps), "num_heads": str(self.num_heads),
                "source": self.source.path.name}

    def manifest(self, weights: Path) -> dict[str, Any]:
        src = self.source
        return {
            "format": FORMAT, "format_version": int(FORMAT_VERSION), "layout": self.layout, "preset": self.preset,
            "weights": weights.name,
            "encoder_overrides": {"vision_weights": str(weights), **self.overrides},
            "source": {"path": str(src.path), "container": src.container, "wrapper": src.wrapper,
                       "stripped_prefix": src.stripped_prefix,
                       "files": [{"name": f.name, "sha256": sha256_file(f)} for f in src.files],
                       "other_entries": src.extras},
            "tensors": {k: {"shape": list(v.shape), "from": self.origins.get(k, []),
                            **({"note": self.notes[k]} if k in self.notes else {})}
                        for k, v in self.tensors.items()},
            "dropped": self.dropped, "left_to_the_model": self.left, "assumptions": self.assumptions,
        }


@dataclasses.dataclass
class _Built:
    """What the layout's rows have made so far (:class:`Conversion`'s fields of the same names)."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    origins: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    left: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Canonical source keys that went into a target.
    used: set[str] = dataclasses.field(default_factory=set)


def _canonical(ckpt: SourceCheckpoint, layout: Layout) -> dict[str, str]:
    """Canonical key → the key as the file spells it; two spellings of one key are refused."""
    out: dict[str, str] = {}
    for key in ckpt.tensors:
        c = layout.canonical(key)
        if c in out:
            raise WeightLoadError(f"{ckpt.path}: keys {out[c]!r} and {key!r} are the same key "
                                  f"{c!r} (duplicate after mapping); keep one of them")
        out[c] = key
    return out


def check_architecture(ckpt: SourceCheckpoint, layout: Layout, spec: Any, what: str) -> tuple[float, list[str]]:
    """The source's LayerNorm epsilon and what was assumed; refuses a config that contradicts ``spec``."""
    config = source_config(layout, ckpt.config, ckpt.hyper_parameters)
    where = "config.json" if layout.config_from == "config" else "hyper_parameters['config']"
    for key, want in layout.expect.items():
        if key in config and config[key] != want:
            raise WeightLoadError(f"{ckpt.path}: {where} has {key}={config[key]!r}; {layout.title} checkpoint "
                                  f"the encoder can compute has {key}={want!r}")
    assumptions = []
    for check in layout.checks:
        mine = getattr(spec, check.spec)
        if check.key not in config:
            assumptions.append(f"{check.key} not stated by the source: {check.spec}={mine!r} of {what} assumed")
            continue
        value = config[check.key]
        if not (value == mine if check.relation == "==" else value >= mine):
            need = f"at least {mine!r}" if check.relation == ">=" else repr(mine)
            raise WeightLoadError(f"{ckpt.path}: {where} has {check.key}={value!r}; {what} needs {need} "
                                  f"(its {check.spec})")
    if not layout.config_from:
        assumptions.append(f"{layout.title} state dict does not state its attention heads: num_heads="
                           f"{spec.num_heads} of {what} assumed")
    eps = float(config.get(layout.eps_key, layout.eps_default)) if layout.eps_key else layout.eps_default
    return eps, assumptions


def _as_float(value: torch.Tensor, name: str, source: str) -> torch.Tensor:
    if not value.is_floating_point():
        raise WeightLoadError(f"{source}: key {name!r} is {value.dtype}, a floating-point weight is expected")
    # The sum is finite when every element is (one reduction, cheap); only otherwise count them.
    bad = 0 if bool(torch.isfinite(value.sum())) else int((~torch.isfinite(value)).sum())
    if bad:
        raise WeightLoadError(f"{source}: key {name!r} has {bad} NaN/inf values; weights must be finite")
    return value.to(torch.float32)


def convert(ckpt: SourceCheckpoint, layout: Layout, spec: Any, preset: str = "") -> Conversion:
    """``ckpt`` in the encoder's layout for the architecture ``spec`` (named ``preset`` in errors)."""
    src = str(ckpt.path)
    what = f"preset {preset!r}" if preset else "the encoder"
    canon = _canonical(ckpt, layout)
    matches = {c: layout.match(c) for c in canon}
    tower = [c for c, m in matches.items() if any(r.target.startswith(VISION_PREFIXES) for r, _ in m)]
    if not tower:
        first = next(iter(ckpt.tensors), "none")
        raise WeightLoadError(f"{src}: not {layout.title} state dict (none of its {len(canon)} keys is one of its "
                              f"vision tower's, e.g. {first!r})")
    eps, assumptions = check_architecture(ckpt, layout, spec, what)
    for c, m in matches.items():
        if not m:
            raise WeightLoadError(f"{src}: unexpected key {canon[c]!r}: not part of {layout.title} checkpoint "
                                  "(another model?)")
    shapes = target_shapes(spec)
    built = _Built()
    for rule in layout.rules:
        if rule.op == "drop":
            continue
        indices: list[int | None] = [None]
        if "{i}" in rule.target:
            seen = {i for m in matches.values() for r, i in m if r is rule and i is not None}
            indices = sorted(seen | set(range(spec.depth)))
        for i in indices:
            _apply(rule, i, canon, ckpt, spec, shapes, what, src, built)
    for c, m in matches.items():
        if c not in built.used and canon[c] not in built.dropped:
            drop = next((r for r, _ in m if r.op == "drop"), None)
            built.dropped[canon[c]] = drop.why if drop else "not used by this preset"
    for key, shape in shapes.items():
        if key.startswith(VISION_PREFIXES) and key not in built.tensors:
            raise WeightLoadError(f"{src}: {what} has {key!r} {list(shape)}, which {layout.title} checkpoint "
                                  "does not hold (a convolutional stem?)")
    overrides: dict[str, Any] = {} if math.isclose(eps, spec.layer_norm_eps, rel_tol=1e-9) else {
        "layer_norm_eps": eps}
    if "text_embeddings.word_embeddings.weight" in built.tensors and getattr(spec, "pretrained_text", False):
        overrides["pretrained_text"] = False  # the file's word table replaces MiniLM's
    return Conversion(layout.name, preset, ckpt, built.tensors, built.origins, built.notes, built.dropped,
                      built.left, eps, spec.num_heads, overrides, assumptions)


def _apply(rule: Rule, i: int | None, canon: Mapping[str, str], ckpt: SourceCheckpoint, spec: Any,
           shapes: Mapping[str, tuple[int, ...]], what: str, src: str, built: _Built) -> None:
    """One row of the table for block ``i``: the target made in ``built``, or the sources dropped with their reason."""
    tensors, origins, notes, dropped, left = built.tensors, built.origins, built.notes, built.dropped, built.left
    names = [fill(s, i) for s in rule.sources]
    target = fill(rule.target, i)
    present = [n in canon for n in names]
    if i is not None and i >= spec.depth:
        for n in (n for n, p in zip(names, present) if p):
            dropped[canon[n]] = f"block {i} is beyond the depth {spec.depth} of {what}"
        return
    if target not in shapes:
        for n in (n for n, p in zip(names, present) if p):
            if rule.needs_target:
                raise WeightLoadError(f"{src}: key {canon[n]!r} has no place in {what}: it has no {target!r}")
            dropped.setdefault(canon[n], f"{what} has no {target!r} ({rule.why})")
        return
    if not all(present):
        missing = names[present.index(False)]
        if rule.required or any(present):
            raise WeightLoadError(f"{src}: missing key {missing!r} (for the encoder's {target!r}, shape "
                                  f"{list(shapes[target])})")
        if rule.absent == "zeros":
            tensors[target] = torch.zeros(shapes[target])
            notes[target] = f"not in the source: zeros ({rule.why})"
            origins[target] = []
        else:
            left[target] = "not in the source: the model keeps its own"
        return
    values = [_as_float(ckpt.tensors[canon[n]], canon[n], src) for n in names]
    ctx = _Context([canon[n] for n in names], shapes[target], bool(rule.flag) and fill(rule.flag, i) in canon, src)
    value, note = OPS[rule.op](values, ctx)
    if tuple(value.shape) != shapes[target]:
        got = f"key {ctx.names[0]!r} has shape {list(values[0].shape)}" if len(names) == 1 else (
            f"keys {', '.join(map(repr, ctx.names))} make shape {list(value.shape)}")
        raise WeightLoadError(f"{src}: {got}, {what} expects {list(shapes[target])} for {target!r}")
    tensors[target] = value.contiguous().clone()
    origins[target] = ctx.names
    if note:
        notes[target] = note
    built.used.update(names)


def write_conversion(conv: Conversion, out: str | Path) -> tuple[Path, Path]:
    """Write ``conv`` to ``out`` (safetensors) and its manifest beside it, each atomically."""
    from safetensors.torch import save

    out = Path(out)
    data = save(conv.tensors, metadata=conv.file_metadata())
    manifest = conv.manifest(out)
    existed = out.exists()
    atomic_write_bytes(out, data)
    try:
        atomic_write_json(manifest_path(out), manifest)
    except BaseException:
        if not existed:
            out.unlink(missing_ok=True)
        raise
    return out, manifest_path(out)


def check_converted(ckpt: SourceCheckpoint, cfg: Any, own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A converted file's tensors, checked against the encoder ``cfg`` builds (``own``: its state dict)."""
    meta, src = ckpt.metadata, ckpt.path
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightLoadError(f"{src}: converted weights of format version {meta.get('format_version')!r}; "
                              f"this version reads {FORMAT_VERSION}")
    made_for = f" (converted for preset {meta['preset']!r}; convert again for this one)" if meta.get("preset") else ""
    try:
        eps, heads = float(meta["layer_norm_eps"]), int(meta["num_heads"])
    except (KeyError, ValueError):
        raise WeightLoadError(f"{src}: converted weights without their layer_norm_eps/num_heads") from None
    if not math.isclose(eps, cfg.layer_norm_eps, rel_tol=1e-6):
        raise WeightLoadError(f"{src}: converted from a model with layer_norm_eps={eps:g}; set "
                              f"encoder_overrides.layer_norm_eps: {eps:g} (this encoder has {cfg.layer_norm_eps:g})")
    if heads != cfg.num_heads:
        raise WeightLoadError(f"{src}: converted for num_heads={heads}, this encoder has {cfg.num_heads}{made_for}")
    for key, value in ckpt.tensors.items():
        if key not in own:
            raise WeightLoadError(f"{src}: key {key!r} is not one of this encoder's{made_for}")
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightLoadError(f"{src}: key {key!r} has shape {list(value.shape)}, this encoder expects "
                                  f"{list(own[key].shape)}{made_for}")
        _as_float(value, key, str(src))
    missing = [k for k in own if k.startswith(VISION_PREFIXES) and k not in ckpt.tensors]
    if missing:
        raise WeightLoadError(f"{src}: missing key {missing[0]!r} of the encoder's vision tower")
    return dict(ckpt.tensors)


def load_into(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a converted file, or a timm/DeiT state dict, into ``model`` (a MultimodalEncoder).

    A timm/DeiT file is converted on the way (blocks beyond the model's depth and classifier
    heads ignored, ``pos_embed`` resampled to the model's grid). Returns ``{"loaded", "ignored"}`` keys.
    """
    ckpt = read_checkpoint(path)
    cfg = model.cfg  # type: ignore[attr-defined]
    own = model.state_dict()
    if ckpt.metadata.get("format") == FORMAT:
        tensors, ignored = check_converted(ckpt, cfg, own), []
    else:
        conv = convert(ckpt, TIMM, cfg)
        tensors, ignored = conv.tensors, sorted(conv.dropped)
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)
    return {"loaded": sorted(tensors), "ignored": ignored}


def key_destinations(ckpt: SourceCheckpoint, layout: Layout) -> dict[str, str]:
    """Source key → where ``layout`` sends it ("blocks.3.attn.qkv.weight", "dropped: why", "unexpected")."""
    out = {}
    for key in ckpt.tensors:
        m = layout.match(layout.canonical(key))
        rule, i = next(((r, i) for r, i in m if r.op != "drop"), m[0] if m else (None, None))
        if rule is None:
            out[key] = "unexpected: not a key of this layout"
        elif rule.op == "drop":
            out[key] = f"dropped: {rule.why}"
        else:
            out[key] = fill(rule.target, i) + ("" if rule.op == "copy" else f" ({rule.op})")
    return out
