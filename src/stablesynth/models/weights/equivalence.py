"""What ``stablesynth weights check`` measures: an imported encoder computes what its source computes.

For one encoder preset each source is built at the preset's sizes with random weights
(``references.py``), written to disk as a user would have it, imported through the path
``stablesynth weights import`` takes (read → convert → write → ``vision_weights`` load) and run on
the same input as its source, in fp32:

- ``hf-vit``: a ``ViTModel`` folder (``save_pretrained``); the encoder's vision tower against
  Hugging Face's forward: every hidden state and the pooler output.
- ``hf-vit resampled``: the ``ViTModel`` at half the preset's image size, against Hugging Face's
  forward with ``interpolate_pos_encoding`` at the preset's size (upsampling: both resample bicubically).
- ``hf-deit``: a ``DeiTModel`` folder; against Hugging Face's own modules on ``[CLS] + patches``
  without the distillation token, which the import drops.
- ``timm``: the ``ViTModel``'s saved weights in timm's names, pickled as DeiT's releases are
  (``{"model": ...}``); against the Hugging Face forward.
- ``allinone``: a Lightning checkpoint in the release's layout; the encoder's fused tokens against
  the release's forward for one frame (the temporal roll moves nothing then) with a random patch
  order, then for D frames with the roll off, and All-in-One's readout (the pooler on the text
  [CLS] averaged over frames) computed from the encoder's tokens. Beside them, unbounded, how far
  the roll the encoder does not do moves the D-frame tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from stablesynth.models.encoder import ENCODERS
from stablesynth.models.vit import MultimodalEncoder
from stablesynth.models.weights import references as ref
from stablesynth.models.weights.convert import Conversion, convert, load_into, write_conversion
from stablesynth.models.weights.layouts import resolve
from stablesynth.models.weights.reading import read_checkpoint

#: The bound the issue sets on every compared tensor (fp32).
TOLERANCE = 1e-5
CHECKS: tuple[str, ...] = ("hf-vit", "hf-vit resampled", "hf-deit", "timm", "allinone")


@dataclasses.dataclass
class Measurement:
    """One compared quantity: what, how far apart, and the bound it must stay within (None: reported only)."""

    check: str
    compared: str
    max_abs_diff: float
    #: The largest absolute value of the source's own tensors (how big the compared numbers are).
    scale: float
    bound: float | None = TOLERANCE

    @property
    def ok(self) -> bool:
        return self.bound is None or self.max_abs_diff <= self.bound

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def import_source(source: Path, kind: str, preset: str, out: Path, **overrides: Any) -> tuple[MultimodalEncoder,
                                                                                             Conversion]:
    """``source`` imported for ``preset`` into ``out`` and loaded into a fresh encoder (eval mode)."""
    cfg = ENCODERS.get(preset).replace(**overrides)
    ckpt = read_checkpoint(source)
    conversion = convert(ckpt, resolve(kind, list(ckpt.tensors), ckpt.config), cfg, preset)
    write_conversion(conversion, out)
    encoder = MultimodalEncoder(cfg.replace(**conversion.overrides)).eval()
    load_into(encoder, out)
    return encoder, conversion


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max(ref.max_abs_diff(x, y) for x, y in zip(a, b))


def _scale(*tensors: torch.Tensor) -> float:
    return max(float(t.abs().max()) for t in tensors)


def _pixels(cfg: Any, seed: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)


@torch.no_grad()
def _compare_tower(check: str, encoder: MultimodalEncoder, hf_states: list[torch.Tensor],
                   hf_pooled: torch.Tensor | None, pixels: torch.Tensor) -> list[Measurement]:
    ours = encoder.vision_hidden_states(pixels)
    out = [Measurement(check, f"{len(ours)} hidden states (embeddings, {len(ours) - 2} blocks, final norm)",
                       _diff(ours, hf_states), _scale(*hf_states))]
    if hf_pooled is not None:
        out.append(Measurement(check, "pooler output", ref.max_abs_diff(encoder.pooler(ours[-1][:, 0]), hf_pooled),
                               _scale(hf_pooled)))
    return out


def check_hf(kind: str, preset: str, folder: Path, seed: int = 0, resampled: bool = False) -> list[Measurement]:
    """Hugging Face ``ViTModel``/``DeiTModel`` → import → the encoder's tower against the source's forward."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ENCODERS.get(preset)
    size = cfg.image_size // 2 if resampled else cfg.image_size
    name = f"hf-{kind}" + (" resampled" if resampled else "")
    model = ref.hf_model(kind, cfg, seed, image_size=size)
    source = folder / name.replace(" ", "-")
    model.save_pretrained(str(source))
    encoder, _ = import_source(source, "hf", preset, folder / f"{source.name}.safetensors")
    pixels = _pixels(cfg, seed)
    states, pooled = ref.hf_hidden_states(model, pixels, drop_distillation=kind == "deit", interpolate=resampled)
    return _compare_tower(name, encoder, states, pooled, pixels)


def check_timm(preset: str, folder: Path, seed: int = 0) -> list[Measurement]:
    """A timm-layout ``.pth`` written from a Hugging Face ViT → import → against the Hugging Face forward."""
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = ENCODERS.get(preset)
    model = ref.hf_model("vit", cfg, seed, layer_norm_eps=1e-6)
    model.save_pretrained(str(folder / "timm-from-hf"))
    saved = load_file(str(folder / "timm-from-hf" / "model.safetensors"))
    source = folder / "deit-like.pth"
    torch.save({"model": ref.timm_state_from_hf(saved, cfg.depth)}, source)
    encoder, _ = import_source(source, "timm", preset, folder / "timm.safetensors")
    pixels = _pixels(cfg, seed)
    states, _ = ref.hf_hidden_states(model, pixels)
    return _compare_tower("timm", encoder, states, None, pixels)  # a timm tower has no pooler


def _question(cfg: Any, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(1000, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, cfg.max_text_len // 2:] = 0  # one padded question
    return ids, mask


def _raster(tokens: torch.Tensor, text_len: int, order: list[int]) -> torch.Tensor:
    """The release's ``[text, visual CLS, patches in order]`` as the encoder's ``[CLS, text, patches]``."""
    patches = torch.empty_like(tokens[:, text_len + 1:])
    patches[:, order] = tokens[:, text_len + 1:]
    return torch.cat([tokens[:, text_len:text_len + 1], tokens[:, :text_len], patches], dim=1)


@torch.no_grad()
def check_allinone(preset: str, folder: Path, seed: int = 0, frames: int = 3) -> list[Measurement]:
    """An All-in-One Lightning checkpoint → import → the encoder's tokens against the release's forward.

    The release's word table is as wide as the model; a preset with another ``word_dim`` (MiniLM's
    384 behind a projection) is checked with ``word_dim`` set to the width, as a config importing
    All-in-One must set it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ENCODERS.get(preset)
    overrides = {"word_dim": cfg.width} if cfg.word_dim != cfg.width else {}
    cfg = cfg.replace(**overrides)
    name = "allinone" + "".join(f" ({k}={v})" for k, v in overrides.items())
    state = ref.allinone_state(cfg, seed, frames=frames)
    source = folder / "allinone.ckpt"
    torch.save(ref.allinone_checkpoint(state, ref.allinone_hyper_parameters(cfg, frames)), source)
    encoder, _ = import_source(source, "allinone", preset, folder / "allinone.safetensors", **overrides)
    B, L, C = 2, cfg.max_text_len, cfg.width
    ids, mask = _question(cfg, B, seed)
    g = torch.Generator().manual_seed(seed + 3)
    clip = torch.randn(B, frames, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    order = ref.random_patch_order(cfg.num_patches, seed)
    one = ref.allinone_forward(state, clip[:, :1], ids, mask, cfg.num_heads, order=order)["tokens"]
    flat = ref.allinone_forward(state, clip, ids, mask, cfg.num_heads, roll=False)
    rolled = ref.allinone_forward(state, clip, ids, mask, cfg.num_heads, roll=True)["tokens"]
    ours = encoder.fused_tokens(clip, ids, mask)
    identity = list(range(cfg.num_patches))
    readout = encoder.pooler(ours.view(B, frames, -1, C).mean(dim=1)[:, 1])
    return [
        Measurement(name, "every token, one frame, patches in a random order",
                    ref.max_abs_diff(encoder.fused_tokens(clip[:, :1], ids, mask), _raster(one, L, order)),
                    _scale(one)),
        Measurement(name, f"every token, {frames} frames, the release without its temporal roll",
                    ref.max_abs_diff(ours, _raster(flat["tokens"], L, identity)), _scale(flat["tokens"])),
        Measurement(name, f"All-in-One's readout (pooled text [CLS], {frames} frames, no roll)",
                    ref.max_abs_diff(readout, flat["cls_feats"]), _scale(flat["cls_feats"])),
        Measurement(name, f"what the temporal roll changes ({frames} frames; the encoder does not roll)",
                    ref.max_abs_diff(ours, _raster(rolled, L, identity)), _scale(rolled), bound=None),
    ]


def run_checks(preset: str, folder: Path, seed: int = 0, checks: tuple[str, ...] = CHECKS) -> list[Measurement]:
    """Every check of ``checks`` for ``preset``, its files written under ``folder``."""
    out: list[Measurement] = []
    for name in checks:
        work = folder / name.replace(" ", "-")
        if name == "hf-vit":
            out += check_hf("vit", preset, work, seed)
        elif name == "hf-vit resampled":
            out += check_hf("vit", preset, work, seed, resampled=True)
        elif name == "hf-deit":
            out += check_hf("deit", preset, work, seed)
        elif name == "timm":
            out += check_timm(preset, work, seed)
        elif name == "allinone":
            out += check_allinone(preset, work, seed)
        else:
            raise ValueError(f"unknown check {name!r} (known: {', '.join(CHECKS)})")
    return out
