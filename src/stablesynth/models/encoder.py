"""All-in-One-style multimodal encoder: one shared ViT over a question and one frame.

Parameter names follow timm's DeiT (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv`` …) so a DeiT-Tiny state dict on disk loads without timm. The
text side is All-in-One's: a BERT-vocabulary word embedding (optionally MiniLM's
pretrained 384-wide table behind a learned projection), a text position embedding,
modality-type embeddings and a temporal (frame) embedding.

Each frame is fused with the question on its own: the sequence is
``[CLS] + text tokens + patch tokens`` and the output of a frame is its fused CLS token
after the final norm (and All-in-One's ``tanh(Linear)`` pooler), so
``forward(frames [B, F, 3, S, S], input_ids [B, L], attention_mask [B, L]) -> [B, F, 192]``.

Presets are registered by name (``allinone-ti``, ``allinone-cpu``, ``allinone-cpu-stem``,
``allinone-test``); build one with :func:`create_model`. Weights load from local files only.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt, create_model

from stablesynth.config import Config, ConfigError
from stablesynth.models.vit import TEXT_TYPE as TEXT_TYPE
from stablesynth.models.vit import VIDEO_TYPE as VIDEO_TYPE
from stablesynth.models.vit import Attention as Attention
from stablesynth.models.vit import Block as Block
from stablesynth.models.vit import Mlp as Mlp
from stablesynth.models.vit import MultimodalEncoder, ViTSpec
from stablesynth.models.vit import PatchEmbed as PatchEmbed
from stablesynth.models.vit import Pooler as Pooler
from stablesynth.models.vit import TextEmbeddings as TextEmbeddings
from stablesynth.registry import Registry

MINILM_WORD_KEY = "embeddings.word_embeddings.weight"


class WeightLoadError(ValueError):
    """A weight file is missing, unreadable, lacks a key or has a tensor of the wrong shape."""


def _architecture_fields() -> dict[str, Any]:
    """ViTSpec's fields as pydantic fields: the architecture is declared once, in models/vit.py."""
    hints = typing.get_type_hints(ViTSpec)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(ViTSpec):
        tp = hints[f.name]
        if f.name == "stem_channels":  # YAML writes a list
            tp = Annotated[tuple[StrictInt, ...], Field(strict=False)]
        fields[f.name] = (tp, f.default)
    return fields


class _EncoderSource(Config):
    """What the encoder config adds to :class:`~stablesynth.models.vit.ViTSpec`: where weights come from."""

    #: Load MiniLM's word embeddings from the installed package when the model is built.
    pretrained_text: bool = False
    #: Optional local timm/DeiT state dict loaded when the model is built ("" = none).
    vision_weights: str = ""

    def spec(self) -> ViTSpec:
        return ViTSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ViTSpec)})

    def check(self) -> None:
        try:
            self.spec().check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


#: The encoder's config: every ViTSpec field (the architecture) plus the weight sources.
EncoderConfig = create_model("EncoderConfig", __base__=_EncoderSource, __module__=__name__, **_architecture_fields())


ENCODERS: Registry[EncoderConfig] = Registry("encoder")

ENCODERS.register("allinone-ti")(EncoderConfig(
    image_size=224, patch_size=16, depth=12, num_heads=3, width=192, word_dim=192, max_text_len=40))
# Sized for the embedded demo on 2 CPU cores: 16 patches of 8 px, 4 layers, MiniLM's word table.
ENCODERS.register("allinone-cpu")(EncoderConfig(
    image_size=32, patch_size=8, depth=4, num_heads=3, width=192, mlp_ratio=4.0, word_dim=384,
    max_text_len=16, pretrained_text=True, freeze_word_embeddings=True))
# The CPU encoder that stage 0 pretrains (training/stage0.py): 2 layers behind a small conv
# stem (3×3 stride-2 convs 3→32→64, then 2×2 patches of the 8×8 map: the same 16 tokens).
# Cheaper per step than allinone-cpu and it learns shapes, which plain 8-px patches do not.
ENCODERS.register("allinone-cpu-stem")(EncoderConfig(
    image_size=32, patch_size=8, depth=2, num_heads=3, width=192, mlp_ratio=4.0, word_dim=384,
    max_text_len=16, pretrained_text=True, freeze_word_embeddings=True, stem_channels=(32, 64)))
# Tiny but still 192 wide, so its features have the shape every other part expects.
ENCODERS.register("allinone-test")(EncoderConfig(
    image_size=16, patch_size=8, depth=1, num_heads=3, width=192, mlp_ratio=1.0, word_dim=192,
    max_text_len=8, max_frames=4))


# The network itself lives in models/vit.py (plain PyTorch); it is re-exported here.


def create_model(name: str, **overrides: Any) -> MultimodalEncoder:
    """Build the preset ``name`` with config ``overrides``; loads the local weights the config names."""
    # replace() copies the registered preset, so building a model never mutates it.
    cfg = ENCODERS.get(name).replace(**overrides)
    model = MultimodalEncoder(cfg)
    if cfg.pretrained_text:
        load_word_embeddings(model)
    if cfg.vision_weights:
        load_vision_weights(model, cfg.vision_weights)
    return model


# ----------------------------------------------------------------------------- weight loading

def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".pth", ".pt", ".bin"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise WeightLoadError(f"{path}: unsupported weight format {path.suffix!r} "
                                  "(use .safetensors, or .pth/.pt/.bin)")
    except WeightLoadError:
        raise
    except Exception as exc:
        raise WeightLoadError(f"{path}: cannot read weights: {exc}") from exc
    # DeiT's released .pth files wrap the state dict as {"model": {...}}.
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{path}: not a state dict of tensors")
    return dict(obj)


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubically resample a ``[1, prefix + g², C]`` position embedding to ``num_patches`` positions."""
    old_grid = pos_embed.shape[1] - num_prefix
    old_side, new_side = math.isqrt(old_grid), math.isqrt(num_patches)
    if old_side * old_side != old_grid or new_side * new_side != num_patches:
        raise WeightLoadError(f"pos_embed: cannot resample a {old_grid}-position grid to {num_patches} "
                              "(both must be square)")
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if old_grid == num_patches:
        return pos_embed
    C = pos_embed.shape[-1]
    grid = grid.reshape(1, old_side, old_side, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False,
                         antialias=new_side < old_side)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


_VISION_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
# Classifier heads and DeiT's distillation token have no place in the encoder.
_IGNORED_PREFIXES = ("head.", "head_dist.", "dist_token", "fc_norm.", "pre_logits.")


def load_vision_weights(model: MultimodalEncoder, path: str | Path) -> dict[str, list[str]]:
    """Load a local timm/DeiT state dict into the vision part of ``model``.

    Every vision parameter of the model must be in the file with its shape, except
    ``pos_embed``, which is resampled when the patch grid differs. Blocks beyond the
    model's depth and classifier heads are ignored. Returns ``{"loaded", "ignored"}`` keys.
    """
    state = _read_state_dict(path)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(_VISION_PREFIXES)}
    num_prefix = 2 if "dist_token" in state else 1
    if not any(k in state for k in own):
        raise WeightLoadError(f"{path}: not a timm/DeiT vision state dict (no 'patch_embed.proj.weight', "
                              "'cls_token', 'blocks.*' keys)")
    new: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in state:
            raise WeightLoadError(f"{path}: missing key {key!r} (expected shape {list(target.shape)})")
        value = state[key]
        if key == "pos_embed" and value.dim() == 3 and value.shape[-1] == target.shape[-1]:
            if num_prefix == 2:
                value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
            value = resize_pos_embed(value, model.cfg.num_patches)
        if tuple(value.shape) != tuple(target.shape):
            raise WeightLoadError(f"{path}: key {key!r} has shape {list(value.shape)}, "
                                  f"the model expects {list(target.shape)}")
        new[key] = value.to(target.dtype)
    ignored = sorted(k for k in state if k not in new)
    unknown = [k for k in ignored if not k.startswith(_IGNORED_PREFIXES + _VISION_PREFIXES)]
    if unknown:
        raise WeightLoadError(f"{path}: unexpected key {unknown[0]!r} — not a timm/DeiT vision state dict")
    model.load_state_dict(new, strict=False)
    return {"loaded": sorted(new), "ignored": ignored}


def load_word_embeddings(model: MultimodalEncoder, path: str | Path | None = None,
                         key: str = MINILM_WORD_KEY) -> None:
    """Copy a BERT-vocabulary word table (default: the installed MiniLM's) into ``model``.

    A key that only ends with ``key`` (e.g. ``bert.embeddings.word_embeddings.weight``) is
    accepted too, so full BERT checkpoints load.
    """
    if path is None:
        from stablesynth.assets import minilm_dir

        try:
            path = minilm_dir() / "model.safetensors"
        except FileNotFoundError as exc:
            raise WeightLoadError(str(exc)) from exc
    state = _read_state_dict(path)
    matches = [k for k in state if k == key or k.endswith("." + key)]
    if not matches:
        raise WeightLoadError(f"{path}: missing key {key!r}")
    value = state[matches[0]]
    table = model.text_embeddings.word_embeddings.weight
    if tuple(value.shape) != tuple(table.shape):
        same_rows = value.dim() == 2 and value.shape[0] == table.shape[0]
        hint = f" (set word_dim={value.shape[-1]})" if same_rows else ""
        raise WeightLoadError(f"{path}: key {matches[0]!r} has shape {list(value.shape)}, the model expects "
                              f"{list(table.shape)}{hint}")
    with torch.no_grad():
        table.copy_(value.to(table.dtype))
