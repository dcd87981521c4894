"""Devices of the benchmark: camera capture profiles, session drift, usage skew, per-frame jitter.

A device differs from another the way cameras and users do (DESIGN.md §5):

* a :class:`CaptureProfile` (white-balance gains, gamma, contrast, brightness, sensor
  noise, lens blur) applied to every frame it records, with a small drift between the
  session that produced its history and its real-time session;
* a usage skew: a Dirichlet draw over answers (or question types) that weights which
  questions the device's user asks.

Everything is applied to whole batches in torch; the per-frame randomness of a clip comes
from a per-clip seed so a clip renders to the same pixels every time it is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Layout of a profile as a tensor row; the collate works on [B, PROFILE_DIM] rows.
PROFILE_FIELDS: tuple[str, ...] = (
    "gain_r",
    "gain_g",
    "gain_b",
    "gamma",
    "contrast",
    "brightness",
    "noise_std",
    "blur_sigma",
)
PROFILE_DIM = len(PROFILE_FIELDS)


@dataclass(frozen=True)
class CaptureProfile:
    """How one camera session renders a scene (pixel values in [0, 1]).

    Applied in the order light meets a camera: lens blur (Gaussian, ``blur_sigma`` pixels
    at capture resolution), white-balance ``gains`` per RGB channel, additive sensor noise
    (``noise_std``), clipping, tone curve ``x ** gamma`` (gamma > 1 darkens mid-tones), then
    ``contrast`` about mid-grey and ``brightness`` offset, clipped to [0, 1].
    """

    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        if len(self.gains) != 3:
            raise ValueError(f"gains must have 3 values (R, G, B), got {self.gains!r}")
        values = self.as_tuple()
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"capture profile values must be finite, got {values}")
        if min(self.gains) < 0 or self.gamma <= 0 or self.contrast < 0:
            raise ValueError(f"gains/contrast must be >= 0 and gamma > 0, got {self}")
        if self.noise_std < 0 or self.blur_sigma < 0:
            raise ValueError(f"noise_std and blur_sigma must be >= 0, got {self}")

    @classmethod
    def identity(cls) -> CaptureProfile:
        return cls()

    def as_tuple(self) -> tuple[float, ...]:
        return (*map(float, self.gains), self.gamma, self.contrast, self.brightness, self.noise_std, self.blur_sigma)

    def to_tensor(self) -> torch.Tensor:
        """The profile as a float32 ``[PROFILE_DIM]`` row (order: :data:`PROFILE_FIELDS`)."""
        return torch.tensor(self.as_tuple(), dtype=torch.float32)

    @classmethod
    def from_tensor(cls, row: torch.Tensor | Sequence[float]) -> CaptureProfile:
        v = [float(x) for x in (row.tolist() if isinstance(row, torch.Tensor) else row)]
        if len(v) != PROFILE_DIM:
            raise ValueError(f"a profile row has {PROFILE_DIM} values, got {len(v)}")
        return cls(
            gains=(v[0], v[1], v[2]), gamma=v[3], contrast=v[4], brightness=v[5], noise_std=v[6], blur_sigma=v[7]
        )

    def to_dict(self) -> dict[str, float]:
        return dict(zip(PROFILE_FIELDS, self.as_tuple()))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``x [M, C, H, W]`` with one sigma per image ``[M]`` (all > 0).

    Kernels differ per image, so instead of a grouped convolution (slow with thousands of
    groups on CPU) each axis is a weighted sum of 2r+1 shifted views of the padded image.
    """
    _, _, h, w = x.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    radius = min(radius, h - 1, w - 1)  # reflect padding needs pad < size
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True))[:, :, None, None, None]  # [M, 2r+1, 1, 1, 1]
    pad = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = sum(k[:, j] * pad[..., j : j + w] for j in range(2 * radius + 1))
    pad = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return sum(k[:, j] * pad[..., j : j + h, :] for j in range(2 * radius + 1))


def _broadcast_params(params: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    if params.shape[-1] != PROFILE_DIM:
        raise ValueError(f"profile params must end in {PROFILE_DIM} values, got shape {tuple(params.shape)}")
    p_lead = params.shape[:-1]
    if len(p_lead) > len(lead) or tuple(lead[: len(p_lead)]) != tuple(p_lead):
        raise ValueError(f"profile params {tuple(params.shape)} do not match frames' leading dims {tuple(lead)}")
    extra = len(lead) - len(p_lead)
    return params.reshape(*p_lead, *([1] * extra), PROFILE_DIM).expand(*lead, PROFILE_DIM)


def apply_profiles(frames: torch.Tensor, params: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Render ``frames [..., 3, H, W]`` (values in [0, 1]) through one capture profile per image.

    ``params`` holds :class:`CaptureProfile` rows ``[*lead', PROFILE_DIM]`` whose leading dims
    are a prefix of the frames' (``[B, 8]`` applies one profile to all frames of clip b).
    ``noise`` is a standard-normal tensor shaped like ``frames``, scaled by each profile's
    ``noise_std`` (None: no sensor noise). The identity profile returns the input unchanged.
    """
    if frames.dim() < 4 or frames.shape[-3] != 3:
        raise ValueError(f"frames must be [..., 3, H, W], got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise TypeError(f"frames must be floating point in [0, 1], got {frames.dtype}")
    if noise is not None and noise.shape != frames.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must match frames {tuple(frames.shape)}")
    lead = frames.shape[:-3]
    p = _broadcast_params(params.to(frames.dtype), lead).reshape(-1, PROFILE_DIM)
    if not torch.isfinite(p).all():
        raise ValueError("profile params contain NaN or inf")
    x = frames.reshape(-1, *frames.shape[-3:])

    blur = p[:, 7]
    blurred = blur > 0
    if bool(blurred.any()):
        # Only blurred images go through the convolution, so sigma 0 is exactly a no-op.
        idx = blurred.nonzero().squeeze(1)
        x = x.index_copy(0, idx, _gaussian_blur(x[idx], blur[idx]))
    x = x * p[:, 0:3, None, None]
    if noise is not None:
        x = x + p[:, 6, None, None, None] * noise.reshape(x.shape)
    x = x.clamp(0.0, 1.0)
    gamma = p[:, 3, None, None, None]
    x = torch.where(gamma == 1.0, x, x.pow(gamma))
    c = p[:, 4, None, None, None]
    b = p[:, 5, None, None, None]
    # Written as x·c + offset (not (x − ½)·c + ½) so contrast 1, brightness 0 is exact.
    x = x * c + (0.5 * (1.0 - c) + b)
    return x.clamp(0.0, 1.0).reshape(frames.shape)


@dataclass(frozen=True)
class JitterConfig:
    """Per-frame variation inside one clip (a hand-held camera over a few frames)."""

    shift_px: float = 2.0
    noise_std: float = 0.01
    brightness_std: float = 0.02


def capture_clips(
    images: torch.Tensor,
    params: torch.Tensor,
    seeds: torch.Tensor,
    n_frames: int,
    size: int,
    jitter: JitterConfig | None = None,
) -> torch.Tensor:
    """Record ``n_frames`` frames of each scene with its device's profile.

    images: uint8 ``[B, 3, H, W]`` scenes; params: ``[B, PROFILE_DIM]`` profile rows
    (``blur_sigma`` in pixels of the scene, rescaled to ``size``); seeds: long ``[B]``
    per-clip seeds (all per-frame randomness derives from them, so a clip's pixels do not
    depend on which batch it is in). Returns float32 ``[B, n_frames, 3, size, size]`` in
    [0, 1]. ``jitter=None`` disables all per-frame variation (frames then differ only by
    the profile's sensor noise).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    b, _, h, w = images.shape
    if params.shape != (b, PROFILE_DIM) or seeds.shape != (b,):
        raise ValueError(
            f"params must be [{b}, {PROFILE_DIM}] and seeds [{b}], got {tuple(params.shape)}, {tuple(seeds.shape)}"
        )
    if n_frames < 1 or size < 1:
        raise ValueError(f"n_frames and size must be >= 1, got {n_frames}, {size}")
    jit = jitter or JitterConfig(0.0, 0.0, 0.0)
    shifts = torch.empty(b, n_frames, 2)
    flicker = torch.empty(b, n_frames)
    noise = torch.empty(b, n_frames, 3, size, size)
    for i, s in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(int(s))
        shifts[i] = (torch.rand(n_frames, 2, generator=g) * 2 - 1) * jit.shift_px
        flicker[i] = torch.randn(n_frames, generator=g) * jit.brightness_std
        noise[i] = torch.randn(n_frames, 3, size, size, generator=g)

    x = images.to(torch.float32).div_(255.0)
    if jit.shift_px > 0 or (h, w) != (size, size):
        # One resampling does the jitter shift and the resize. A pixel shift of dx is 2·dx/W in
        # grid_sample's normalised coordinates; halving 64 → 32 samples exactly between 2×2
        # source pixels, i.e. box-filter downsampling, so no separate anti-aliasing is needed.
        theta = torch.zeros(b, n_frames, 2, 3)
        theta[..., 0, 0] = 1.0
        theta[..., 1, 1] = 1.0
        theta[..., 0, 2] = 2.0 * shifts[..., 0] / w
        theta[..., 1, 2] = 2.0 * shifts[..., 1] / h
        grid = F.affine_grid(theta.reshape(-1, 2, 3), [b * n_frames, 3, size, size], align_corners=False)
        src = x.unsqueeze(1).expand(b, n_frames, 3, h, w).reshape(-1, 3, h, w)
        x = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x.reshape(b, n_frames, 3, size, size)
    else:
        x = x.unsqueeze(1).expand(b, n_frames, 3, h, w).contiguous()
    p = params.to(torch.float32).clone()
    p[:, 7] *= size / w
    x = apply_profiles(x, p, noise)
    if jit.noise_std > 0 or jit.brightness_std > 0:
        # Exposure flicker per frame, plus a noise floor that even a noiseless profile shows
        # (it reuses the sensor noise draw, scaled, instead of drawing a second tensor).
        x = (x + flicker[:, :, None, None, None] + jit.noise_std * noise).clamp(0.0, 1.0)
    return x


@dataclass(frozen=True)
class ProfileRanges:
    """Where device profiles are drawn from (uniform; gamma log-uniform)."""

    gain: tuple[float, float] = (0.55, 1.45)
    gamma: tuple[float, float] = (0.7, 1.45)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: tuple[float, float] = (-0.1, 0.1)
    noise_std: tuple[float, float] = (0.0, 0.06)
    blur_sigma: tuple[float, float] = (0.0, 1.2)


@dataclass(frozen=True)
class DeviceSpec:
    """One device: its id, whether the cloud trains on it, its two sessions and its usage skew.

    skew: probabilities ``[n_categories]`` over answers or question types (``skew_over``).
    """

    id: int
    seen: bool
    history: CaptureProfile
    realtime: CaptureProfile
    skew: tuple[float, ...]
    skew_over: str

    def profile(self, split: str) -> CaptureProfile:
        if split == "history":
            return self.history
        if split == "realtime":
            return self.realtime
        raise ValueError(f"unknown split {split!r} (known: history, realtime)")

    def drift(self) -> float:
        """L2 distance between the history and real-time profile rows (how far the camera moved)."""
        return float((self.history.to_tensor() - self.realtime.to_tensor()).norm())


def sample_profile(rng: np.random.Generator, ranges: ProfileRanges) -> CaptureProfile:
    gains = rng.uniform(*ranges.gain, size=3)
    lo, hi = ranges.gamma
    gamma = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    return CaptureProfile(
        gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        gamma=gamma,
        contrast=float(rng.uniform(*ranges.contrast)),
        brightness=float(rng.uniform(*ranges.brightness)),
        noise_std=float(rng.uniform(*ranges.noise_std)),
        blur_sigma=float(rng.uniform(*ranges.blur_sigma)),
    )


def drift_profile(rng: np.random.Generator, base: CaptureProfile, drift: float) -> CaptureProfile:
    """A nearby session of the same camera: multiplicative drift on gains/gamma/contrast/noise,
    additive on brightness and blur, of relative size ``drift``."""
    if drift == 0:
        return base
    z = rng.standard_normal(8)
    gains = tuple(float(g * math.exp(drift * z[i])) for i, g in enumerate(base.gains))
    return CaptureProfile(
        gains=(gains[0], gains[1], gains[2]),
        gamma=float(base.gamma * math.exp(drift * z[3])),
        contrast=float(base.contrast * math.exp(drift * z[4])),
        brightness=float(base.brightness + 0.5 * drift * z[5]),
        noise_std=float(base.noise_std * math.exp(drift * z[6])),
        blur_sigma=float(max(0.0, base.blur_sigma + drift * z[7])),
    )


def sample_devices(
    rng: np.random.Generator,
    n_devices: int,
    n_unseen: int,
    n_categories: int,
    skew_over: str,
    skew_alpha: float,
    ranges: ProfileRanges,
    drift: float,
) -> list[DeviceSpec]:
    """Draw ``n_devices`` devices; ``n_unseen`` of them (chosen at random) are held out of training."""
    if not 0 <= n_unseen < n_devices:
        raise ValueError(f"need 0 <= n_unseen < n_devices, got {n_unseen}, {n_devices}")
    unseen = set(rng.choice(n_devices, size=n_unseen, replace=False).tolist())
    out = []
    for d in range(n_devices):
        hist = sample_profile(rng, ranges)
        real = drift_profile(rng, hist, drift)
        skew = rng.dirichlet(np.full(n_categories, skew_alpha))
        out.append(
            DeviceSpec(
                id=d,
                seen=d not in unseen,
                history=hist,
                realtime=real,
                skew=tuple(float(s) for s in skew),
                skew_over=skew_over,
            )
        )
    return out
