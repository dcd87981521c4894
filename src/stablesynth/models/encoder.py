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

Presets are registered by name (``allinone-ti``, ``allinone-cpu``, ``allinone-test``);
build one with :func:`create_model`. Weights load from local files only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stablesynth.config import Config, require
from stablesynth.registry import Registry

TEXT_TYPE = 0
VIDEO_TYPE = 1
MINILM_WORD_KEY = "embeddings.word_embeddings.weight"


class WeightLoadError(ValueError):
    """A weight file is missing, unreadable, lacks a key or has a tensor of the wrong shape."""


@dataclass
class EncoderConfig(Config):
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    vocab_size: int = 30522
    #: Width of the word-embedding table; a Linear projects it to ``width`` when they differ
    #: (MiniLM's pretrained table is 384 wide).
    word_dim: int = 192
    max_text_len: int = 40
    #: Rows of the temporal embedding: the most frames one clip may have.
    max_frames: int = 16
    drop_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    #: All-in-One's pooler tanh(Linear(x_cls)) on the fused CLS token.
    use_pooler: bool = True
    #: Load MiniLM's word embeddings from the installed package when the model is built.
    pretrained_text: bool = False
    #: Keep the word table fixed (it is 30522 rows: updating it dominates a CPU step).
    freeze_word_embeddings: bool = False
    #: Optional local timm/DeiT state dict loaded when the model is built ("" = none).
    vision_weights: str = ""

    def validate(self) -> None:
        for key in ("image_size", "patch_size", "in_chans", "width", "depth", "num_heads", "vocab_size",
                    "word_dim", "max_text_len", "max_frames"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.image_size % self.patch_size == 0, "patch_size",
                f"{self.patch_size} does not divide image_size {self.image_size}")
        require(self.width % self.num_heads == 0, "num_heads",
                f"{self.num_heads} does not divide width {self.width}")
        require(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        require(0.0 <= self.drop_rate < 1.0, "drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        require(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ENCODERS: Registry[EncoderConfig] = Registry("encoder")

ENCODERS.register("allinone-ti")(EncoderConfig(
    image_size=224, patch_size=16, depth=12, num_heads=3, width=192, word_dim=192, max_text_len=40))
# Sized for the embedded demo on 2 CPU cores: 16 patches of 8 px, 4 layers, MiniLM's word table.
ENCODERS.register("allinone-cpu")(EncoderConfig(
    image_size=32, patch_size=8, depth=4, num_heads=3, width=192, mlp_ratio=4.0, word_dim=384,
    max_text_len=16, pretrained_text=True, freeze_word_embeddings=True))
# Tiny but still 192 wide, so its features have the shape every other part expects.
ENCODERS.register("allinone-test")(EncoderConfig(
    image_size=16, patch_size=8, depth=1, num_heads=3, width=192, mlp_ratio=1.0, word_dim=192,
    max_text_len=8, max_frames=4))


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, qkv_bias: bool, drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, width * 3, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.drop = drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.drop_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TextEmbeddings(nn.Module):
    """BERT-style text embeddings: word table (+ projection), positions, LayerNorm."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        self.word_proj: nn.Module = (nn.Linear(cfg.word_dim, cfg.width) if cfg.word_dim != cfg.width
                                     else nn.Identity())
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=1e-12)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_proj(self.word_embeddings(input_ids)) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls))


class MultimodalEncoder(nn.Module):
    """One shared transformer over ``[CLS] + question + patches`` of each frame → ``[B, F, width]``."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.text_embeddings = TextEmbeddings(cfg)
        self.token_type_embeddings = nn.Embedding(2, cfg.width)
        self.temporal_embed = nn.Parameter(torch.zeros(1, cfg.max_frames, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.pooler: nn.Module = Pooler(cfg.width) if cfg.use_pooler else nn.Identity()
        self._init_weights()
        if cfg.freeze_word_embeddings:
            self.text_embeddings.word_embeddings.weight.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return self.cfg.width

    def _init_weights(self) -> None:
        # timm's ViT/DeiT initialisation, so training from scratch starts where DeiT did.
        for t in (self.pos_embed, self.cls_token, self.temporal_embed):
            nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_inputs(self, frames: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> None:
        cfg = self.cfg
        if frames.dim() != 5:
            raise ValueError(f"frames must be [B, F, {cfg.in_chans}, S, S], got shape {tuple(frames.shape)}")
        B, nF, chans, height, width = frames.shape
        if (chans, height, width) != (cfg.in_chans, cfg.image_size, cfg.image_size):
            raise ValueError(f"frames must be [B, F, {cfg.in_chans}, {cfg.image_size}, {cfg.image_size}], "
                             f"got shape {tuple(frames.shape)}")
        if nF > cfg.max_frames:
            raise ValueError(f"{nF} frames per clip exceed max_frames={cfg.max_frames}")
        if input_ids.dim() != 2 or input_ids.shape[0] != B:
            raise ValueError(f"input_ids must be [B={B}, L], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_text_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds max_text_len={cfg.max_text_len}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")

    def forward(self, frames: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(frames, input_ids, attention_mask)
        B, nF = frames.shape[:2]
        # Text is embedded once per clip and shared by its frames.
        text = self.text_embeddings(input_ids) + self.token_type_embeddings.weight[TEXT_TYPE]
        text = text.repeat_interleave(nF, dim=0)  # [B·F, L, C]

        patches = self.patch_embed(frames.flatten(0, 1)) + self.pos_embed[:, 1:]
        temporal = self.temporal_embed[0, :nF].repeat(B, 1).unsqueeze(1)  # [B·F, 1, C], frame f of clip b
        patches = patches + temporal + self.token_type_embeddings.weight[VIDEO_TYPE]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B * nF, -1, -1)
        x = self.pos_drop(torch.cat([cls, text, patches], dim=1))

        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Keys only: padded text tokens are never attended to; every query still sees CLS.
            keep_text = attention_mask.bool().repeat_interleave(nF, dim=0)
            ones = torch.ones(B * nF, 1, dtype=torch.bool, device=x.device)
            keep = torch.cat([ones, keep_text, ones.expand(-1, patches.shape[1])], dim=1)
            mask = keep[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        out = self.pooler(self.norm(x)[:, 0])
        return out.reshape(B, nF, -1)


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
