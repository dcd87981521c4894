import math

import numpy as np
import pytest
import torch

from stablesynth.data.devices import (
    PROFILE_DIM,
    CaptureProfile,
    JitterConfig,
    ProfileRanges,
    apply_profiles,
    capture_clips,
    sample_devices,
)


def _params(profile: CaptureProfile, n: int) -> torch.Tensor:
    return profile.to_tensor().expand(n, PROFILE_DIM).contiguous()


def test_identity_profile_leaves_pixels_unchanged():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(4, 5, 3, 16, 16, generator=g)
    noise = torch.randn(frames.shape, generator=g)
    out = apply_profiles(frames, _params(CaptureProfile.identity(), 4), noise)
    assert torch.equal(out, frames)


def test_gain_scales_channels_and_gamma_is_a_power():
    frames = torch.full((1, 3, 4, 4), 0.25)
    out = apply_profiles(frames, _params(CaptureProfile(gains=(2.0, 1.0, 0.5)), 1))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.5, 0.25, 0.125]))
    # gains clip at white: a bright channel saturates instead of wrapping
    out = apply_profiles(torch.full((1, 3, 2, 2), 0.8), _params(CaptureProfile(gains=(1.5, 1.0, 1.0)), 1))
    assert out[0, 0].max() == 1.0
    out = apply_profiles(torch.full((1, 3, 2, 2), 0.5), _params(CaptureProfile(gamma=2.0), 1))
    assert torch.allclose(out, torch.full_like(out, 0.25))
    out = apply_profiles(torch.full((1, 3, 2, 2), 0.5), _params(CaptureProfile(gamma=0.5), 1))
    assert torch.allclose(out, torch.full_like(out, math.sqrt(0.5)))
    out = apply_profiles(torch.full((1, 3, 2, 2), 0.6), _params(CaptureProfile(contrast=2.0, brightness=0.1), 1))
    assert torch.allclose(out, torch.full_like(out, (0.6 - 0.5) * 2 + 0.5 + 0.1))


def test_noise_and_blur():
    frames = torch.full((2, 3, 32, 32), 0.5)
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(1))
    params = torch.stack([CaptureProfile(noise_std=0.05).to_tensor(), CaptureProfile().to_tensor()])
    out = apply_profiles(frames, params, noise)
    assert abs(float((out[0] - 0.5).std()) - 0.05) < 0.005
    assert torch.equal(out[1], frames[1])  # one profile per image

    delta = torch.zeros(1, 3, 15, 15)
    delta[..., 7, 7] = 1.0
    out = apply_profiles(delta, _params(CaptureProfile(blur_sigma=1.0), 1))
    assert abs(float(out.sum()) - 3.0) < 1e-4  # blur keeps the light
    assert out[0, 0, 7, 7] < 0.3 and out[0, 0, 7, 8] > 0.05
    assert torch.allclose(out[0, 0], out[0, 0].T, atol=1e-6)  # isotropic


def test_profile_validation_and_round_trip():
    p = CaptureProfile(gains=(0.6, 1.2, 1.4), gamma=1.1, contrast=0.9, brightness=-0.05, noise_std=0.02, blur_sigma=0.5)
    assert CaptureProfile.from_tensor(list(p.as_tuple())) == p
    assert np.allclose(CaptureProfile.from_tensor(p.to_tensor()).as_tuple(), p.as_tuple())
    with pytest.raises(ValueError):
        CaptureProfile(gamma=0.0)
    with pytest.raises(ValueError):
        CaptureProfile(noise_std=float("nan"))
    with pytest.raises(ValueError):
        apply_profiles(torch.rand(2, 3, 4, 4), torch.ones(3, PROFILE_DIM))
    with pytest.raises(ValueError):
        apply_profiles(torch.rand(2, 3, 4, 4), torch.full((2, PROFILE_DIM), float("nan")))
    with pytest.raises(TypeError):
        apply_profiles(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.ones(2, PROFILE_DIM))


def test_capture_is_seeded_and_jitters_frames():
    images = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    params = _params(CaptureProfile(noise_std=0.02), 3)
    seeds = torch.tensor([5, 6, 7])
    jit = JitterConfig(shift_px=2.0, noise_std=0.01, brightness_std=0.02)
    a = capture_clips(images, params, seeds, 5, 32, jit)
    b = capture_clips(images, params, seeds, 5, 32, jit)
    assert a.shape == (3, 5, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # frames of a clip differ
    single = capture_clips(images[1:2], params[1:2], seeds[1:2], 5, 32, jit)
    assert torch.allclose(single[0], a[1], atol=1e-6)  # a clip does not depend on its batch
    # no jitter, identity profile, same size: the scene itself
    still = capture_clips(images, _params(CaptureProfile(), 3), seeds, 2, 64, None)
    assert torch.equal(still[:, 0], images.float() / 255)


def test_sample_devices_seeded_and_unseen_count():
    kw = dict(
        n_devices=8, n_unseen=2, n_categories=13, skew_over="answer", skew_alpha=0.5, ranges=ProfileRanges(), drift=0.05
    )
    a = sample_devices(np.random.default_rng(0), **kw)
    b = sample_devices(np.random.default_rng(0), **kw)
    c = sample_devices(np.random.default_rng(1), **kw)
    assert a == b and a != c
    assert sum(not d.seen for d in a) == 2
    for d in a:
        assert min(d.history.gains) >= 0.55 and max(d.history.gains) <= 1.45
        assert abs(sum(d.skew) - 1) < 1e-9 and len(d.skew) == 13
        assert 0 < d.drift() < 1
    with pytest.raises(ValueError):
        sample_devices(np.random.default_rng(0), **{**kw, "n_unseen": 8})
