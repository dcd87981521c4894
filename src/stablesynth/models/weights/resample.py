"""Resampling a position embedding to another patch grid (a checkpoint of another image size)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stablesynth.models.weights.errors import WeightLoadError


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubically resample a ``[1, prefix + g², C]`` position embedding to ``num_patches`` positions.

    The class token's rows (``num_prefix``) are kept; the grid is resampled as an image
    (``align_corners=False``, as timm and Hugging Face's ``interpolate_pos_encoding`` do, so a model
    imported at a larger size computes what the source computes on that size), antialiased when
    it shrinks.
    """
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
