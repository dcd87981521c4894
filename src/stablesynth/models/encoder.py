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
import typing
from pathlib import Path
from typing import Annotated, Any

import torch
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
from stablesynth.models.weights.convert import load_into
from stablesynth.models.weights.errors import WeightLoadError as WeightLoadError
from stablesynth.models.weights.reading import read_tensors
from stablesynth.models.weights.resample import resize_pos_embed as resize_pos_embed
from stablesynth.registry import Registry

MINILM_WORD_KEY = "embeddings.word_embeddings.weight"


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
    #: Optional local weights loaded when the model is built ("" = none): a file written by
    #: ``stablesynth weights import`` (timm, Hugging Face ViT/DeiT or All-in-One, converted for this
    #: preset; docs/weights.md), or a timm/DeiT state dict.
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


def load_vision_weights(model: MultimodalEncoder, path: str | Path) -> dict[str, list[str]]:
    """Load local weights into ``model``: a file ``stablesynth weights import`` wrote, or a timm/DeiT state dict.

    A converted file must fit the model exactly (it was converted for its preset) and may carry
    the text side too (an All-in-One import). A timm/DeiT state dict is converted on the way:
    every vision parameter of the model must be in it with its shape, except ``pos_embed``,
    which is resampled when the patch grid differs; blocks beyond the model's depth and
    classifier heads are ignored. Pickled files are read through the restricted unpickler
    (``models/weights/unpickle.py``). Returns ``{"loaded", "ignored"}`` keys.
    """
    return load_into(model, path)


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
    state = read_tensors(path)
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
