"""Clean easy-VQA for stage 0: clean rendering, camera augmentation, scene labels ready for the aux heads."""

import pytest
import torch

from stablesynth.data.benchmark import normalise_frames
from stablesynth.data.devices import ProfileRanges
from stablesynth.data.easyvqa import load_easyvqa
from stablesynth.data.pretrain import build_pretrain_set, camera_augment


@pytest.fixture(scope="module")
def train16():
    return build_pretrain_set("train", size=16, max_question_len=16)


def test_pretrain_set_is_clean_and_complete(train16):
    data = load_easyvqa()
    assert len(train16) == len(data.train) and train16.answers == data.answers
    assert train16.frames.shape == (data.train.images.shape[0], 3, 16, 16)
    assert float(train16.frames.min()) >= 0.0 and float(train16.frames.max()) <= 1.0
    # A 64 → 16 resize of the scene (no profile, no jitter) keeps its mean colour.
    mean64 = data.train.images[:20].float().div(255).mean(dim=(2, 3))
    assert torch.allclose(train16.frames[:20].mean(dim=(2, 3)), mean64, atol=0.02)
    assert len(train16.fingerprint) == 16
    assert build_pretrain_set("train", size=8).fingerprint != train16.fingerprint


def test_batch_drops_only_all_padding_columns(train16):
    rows = torch.arange(5)
    b = train16.batch(rows)
    length = b["input_ids"].shape[1]
    assert length <= 16 and bool(b["attention_mask"][:, -1].any())
    assert torch.equal(b["input_ids"], train16.input_ids[rows, :length])
    assert int(train16.attention_mask[rows, length:].sum()) == 0
    assert b["frames"].shape == (5, 1, 3, 16, 16)
    assert torch.allclose(b["frames"][:, 0], normalise_frames(train16.frames[train16.image[rows]]))


def test_camera_augment_is_seeded_and_identity_ranges_change_nothing(train16):
    x = train16.frames[:8]
    a = camera_augment(x, torch.Generator().manual_seed(1))
    b = camera_augment(x, torch.Generator().manual_seed(1))
    c = camera_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert float((a - x).abs().mean()) > 0.02
    none = ProfileRanges(gain=(1, 1), gamma=(1, 1), contrast=(1, 1), brightness=(0, 0), noise_std=(0, 0),
                         blur_sigma=(0, 0))
    assert torch.allclose(camera_augment(x, torch.Generator().manual_seed(1), none), x)
