"""The ViT blocks of the multimodal encoder, in plain PyTorch (timm's DeiT parameter names).

:class:`MultimodalEncoder` reads its architecture from any object with the fields of
:class:`ViTSpec` and a ``check()`` method: the project's
:class:`~stablesynth.models.encoder.EncoderConfig` (presets, weight loading) or a plain
:class:`ViTSpec`, so that tools that need only PyTorch (``stablesynth bench train``) build
the same network without the config machinery. This module imports only torch and the
standard library.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TEXT_TYPE = 0
VIDEO_TYPE = 1


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """The encoder's architecture as plain arguments (the fields of ``EncoderConfig`` that shape it).

    Defaults are the paper's All-in-One-Ti (DeiT-Tiny, 224 px, 12 layers, 40 text tokens).
    """

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
    #: Keep the word table fixed (it is 30522 rows: updating it dominates a CPU step).
    freeze_word_embeddings: bool = False
    #: Channels of an optional convolutional stem before the patch projection (empty: DeiT's
    #: plain patchify, timm's parameter names). Each entry is a 3×3 stride-2 conv + GELU; see :class:`PatchEmbed`.
    stem_channels: tuple[int, ...] = ()

    def check(self) -> None:
        """Raise ``ValueError("<field>: <why>")`` for an architecture that cannot be built."""
        for key in ("image_size", "patch_size", "in_chans", "width", "depth", "num_heads", "vocab_size",
                    "word_dim", "max_text_len", "max_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide width {self.width}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate: must be in [0, 1), got {self.drop_rate}")
        if self.layer_norm_eps <= 0:
            raise ValueError("layer_norm_eps: must be > 0")
        problem = stem_problem(self.patch_size, self.stem_channels)
        if problem:
            raise ValueError(f"stem_channels: {problem}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def stem_problem(patch_size: int, stem_channels: tuple[int, ...] | list[int]) -> str:
    """Why ``stem_channels`` does not fit ``patch_size`` ("" when it does)."""
    if any(c < 1 for c in stem_channels):
        return f"every entry must be >= 1, got {list(stem_channels)}"
    stride = 2 ** len(stem_channels)
    if patch_size % stride:
        return f"{len(stem_channels)} stride-2 convs (×{stride}) do not divide patch_size {patch_size}"
    return ""


class PatchEmbed(nn.Module):
    """Image → ``[B, patches, width]`` tokens.

    Without a stem this is DeiT's patchify (``proj``: a ``patch_size`` conv of stride
    ``patch_size``). With ``stem_channels`` (Xiao et al. 2021, "Early convolutions help
    transformers see better") each entry adds a 3×3 stride-2 conv + GELU (``stem.{2i}``),
    and ``proj`` patchifies the stem's map with the remaining stride, so the token grid is
    the same. Existing presets have no stem and keep timm's parameter names.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, width: int,
                 stem_channels: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__()
        self.image_size = image_size
        chans = in_chans
        if stem_channels:
            layers: list[nn.Module] = []
            for c in stem_channels:
                layers += [nn.Conv2d(chans, c, kernel_size=3, stride=2, padding=1), nn.GELU()]
                chans = c
            self.stem = nn.Sequential(*layers)
        rest = patch_size // 2 ** len(stem_channels)
        self.proj = nn.Conv2d(chans, width, kernel_size=rest, stride=rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "stem"):
            x = self.stem(x)
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
    def __init__(self, cfg: Any) -> None:
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

    def __init__(self, cfg: Any) -> None:
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

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.width,
                                      tuple(getattr(cfg, "stem_channels", ())))
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
        # Reading the range back from an accelerator would stall its stream on every forward (and break
        # torch.compile's graph); there, the embedding kernel's own bounds check reports a bad id.
        if (input_ids.device.type == "cpu" and input_ids.numel()
                and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size)):
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")

    def forward(self, frames: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(frames, input_ids, attention_mask)
        # An all-ones mask changes nothing; skipping it keeps the CPU's fastest attention, but deciding
        # that on an accelerator would mean a host read per forward, so there the mask is always built.
        if attention_mask is not None and frames.device.type == "cpu" and bool(attention_mask.all()):
            attention_mask = None
        return self.fuse(frames, input_ids, attention_mask)

    def fuse(self, frames: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` without its input checks, applying ``attention_mask`` whenever one is given.

        This is the graph the ONNX export traces: no value-dependent branch, the mask a real input.
        """
        B, nF = frames.shape[:2]
        out = self.pooler(self.fused_tokens(frames, input_ids, attention_mask)[:, 0])
        return out.reshape(B, nF, -1)

    def fused_tokens(self, frames: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Every token of every frame after the final norm: ``[B·F, 1 + L + patches, width]``.

        The sequence is ``[CLS] + text + patches``; :meth:`fuse` reads the CLS token. Exposed so that
        an import can be compared token by token with the model it came from (docs/weights.md).
        """
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
        if attention_mask is not None:
            # Keys only: padded text tokens are never attended to; every query still sees CLS.
            keep_text = attention_mask.bool().repeat_interleave(nF, dim=0)
            ones = torch.ones(B * nF, 1, dtype=torch.bool, device=x.device)
            keep = torch.cat([ones, keep_text, ones.expand(-1, patches.shape[1])], dim=1)
            mask = keep[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def vision_hidden_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The vision tower alone, as a plain ViT: ``images [B, 3, S, S]`` → each stage's ``[B, 1 + patches, width]``.

        The list holds the embeddings (``[CLS] + patches`` with positions), each block's output and,
        last, the final norm's: what Hugging Face's ``output_hidden_states`` and ``last_hidden_state``
        give, so an imported tower can be compared with its source (no text, type or temporal embedding).
        """
        patches = self.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(images.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, patches], dim=1))
        states = [x]
        for block in self.blocks:
            x = block(x, None)
            states.append(x)
        states.append(self.norm(x))
        return states
