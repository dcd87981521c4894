"""Clean easy-VQA for stage 0 (pretraining): scenes with no device profile, all their questions.

Stage 0 plays the part of the paper's *pretrained* All-in-One: public data that knows
nothing of the benchmark's cameras. :func:`build_pretrain_set` renders every scene of an
easy-VQA split once at the encoder's input size (the benchmark's own resampling, through
the identity profile and without per-frame jitter), tokenises every question once, and
reads each scene's colour and shape off its questions (every scene has one coloured
shape; "what color …" and "what shape …" answers name them), which stage 0 uses as
auxiliary targets.

:func:`camera_augment` is the optional camera-like augmentation: each image through a
random capture profile drawn from :class:`~stablesynth.data.devices.ProfileRanges`
(white-balance gains, gamma, contrast, brightness, sensor noise, blur). All randomness
comes from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch

from stablesynth.data.benchmark import normalise_frames
from stablesynth.data.devices import PROFILE_DIM, CaptureProfile, ProfileRanges, apply_profiles, capture_clips
from stablesynth.data.easyvqa import EasyVQA, load_easyvqa, scene_attributes

#: Bump when rendering or labelling changes what a config produces (the stage-0 cache key holds it).
PRETRAIN_DATA_VERSION = 1


@dataclass(frozen=True)
class PretrainSet:
    """One clean easy-VQA split, ready for stage 0.

    frames:         float32 [N_img, 3, S, S] in [0, 1] (not yet normalised)
    input_ids:      long [N_q, L]; attention_mask: long [N_q, L]
    label:          long [N_q] answer index (``answers`` order)
    image:          long [N_q] index into ``frames``
    question_type:  long [N_q] (easy-VQA's :data:`~stablesynth.data.easyvqa.QUESTION_TYPES`)
    color, shape:   long [N_img] index into COLORS / SHAPES (-100 where no question tells)
    """

    split: str
    answers: tuple[str, ...]
    frames: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label: torch.Tensor
    image: torch.Tensor
    question_type: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    fingerprint: str

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def subset(self, rows: torch.Tensor) -> PretrainSet:
        """The questions ``rows`` (scenes, colours and shapes shared, not copied)."""
        return dataclasses.replace(
            self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows], label=self.label[rows],
            image=self.image[rows], question_type=self.question_type[rows])

    def batch(self, rows: torch.Tensor, generator: torch.Generator | None = None,
              augment: bool = False, ranges: ProfileRanges | None = None) -> dict[str, torch.Tensor]:
        """Questions ``rows`` with their scene: frames ``[B, 1, 3, S, S]`` normalised like the benchmark's."""
        img = self.image[rows]
        frames = self.frames[img]
        if augment:
            frames = camera_augment(frames, generator, ranges)
        # Trailing columns that are padding in every question are dropped (exact: padded keys are
        # masked and positions count from the start), which saves a sixth of the tokens.
        mask = self.attention_mask[rows]
        length = max(2, int(mask.sum(dim=1).max())) if len(rows) else mask.shape[1]
        return {
            "frames": normalise_frames(frames).unsqueeze(1),
            "input_ids": self.input_ids[rows, :length],
            "attention_mask": mask[:, :length],
            "label": self.label[rows],
            "question_type": self.question_type[rows],
            "color": self.color[img],
            "shape": self.shape[img],
        }


def render_clean(images: torch.Tensor, size: int, batch: int = 1000) -> torch.Tensor:
    """uint8 scenes ``[N, 3, H, W]`` → float32 ``[N, 3, size, size]`` in [0, 1], resampled as the
    benchmark renders a frame (identity profile, no jitter)."""
    out = []
    for i in range(0, int(images.shape[0]), batch):
        chunk = images[i:i + batch]
        params = CaptureProfile.identity().to_tensor().expand(len(chunk), -1).contiguous()
        seeds = torch.zeros(len(chunk), dtype=torch.long)
        out.append(capture_clips(chunk, params, seeds, 1, size, None)[:, 0])
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


def _fingerprint(data: EasyVQA, split: str, size: int, max_question_len: int) -> str:
    src = data.split(split)
    h = hashlib.sha256()
    h.update(f"v{PRETRAIN_DATA_VERSION}|{split}|{size}|{max_question_len}|{','.join(data.answers)}".encode())
    h.update(src.images.numpy().tobytes())
    h.update("\n".join(src.questions).encode())
    h.update(src.answer.numpy().tobytes())
    h.update(src.image.numpy().tobytes())
    return h.hexdigest()[:16]


def build_pretrain_set(split: str = "train", size: int = 32, max_question_len: int = 16,
                       data: EasyVQA | None = None) -> PretrainSet:
    """Every scene and question of easy-VQA's ``split``, clean, at ``size`` px (a few seconds)."""
    from stablesynth.data.tokenizer import load_tokenizer

    data = data or load_easyvqa()
    src = data.split(split)
    texts = sorted(set(src.questions))
    index = {t: i for i, t in enumerate(texts)}
    ids, mask = load_tokenizer().encode(texts, max_question_len)
    rows = torch.tensor([index[t] for t in src.questions], dtype=torch.long)
    color, shape = scene_attributes(data, split)
    return PretrainSet(
        split=split, answers=data.answers, frames=render_clean(src.images, size),
        input_ids=ids[rows], attention_mask=mask[rows], label=src.answer.clone(), image=src.image.clone(),
        question_type=src.question_type.clone(), color=color, shape=shape,
        fingerprint=_fingerprint(data, split, size, max_question_len),
    )


def random_profiles(n: int, generator: torch.Generator | None, ranges: ProfileRanges | None = None) -> torch.Tensor:
    """``[n, PROFILE_DIM]`` capture-profile rows drawn like the benchmark's devices (gamma log-uniform)."""
    r = ranges or ProfileRanges()

    def uniform(lo_hi: tuple[float, float], k: int = 1) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, k, generator=generator)

    lo, hi = r.gamma
    gamma = torch.exp(uniform((math.log(lo), math.log(hi))))
    out = torch.cat([uniform(r.gain, 3), gamma, uniform(r.contrast), uniform(r.brightness),
                     uniform(r.noise_std), uniform(r.blur_sigma)], dim=1)
    assert out.shape == (n, PROFILE_DIM)
    return out


def camera_augment(frames: torch.Tensor, generator: torch.Generator | None,
                   ranges: ProfileRanges | None = None) -> torch.Tensor:
    """Each image of ``frames [B, 3, S, S]`` (in [0, 1]) through its own random capture profile.

    Blur is given in pixels of a 64-px scene, as device profiles are, and rescaled to ``S``.
    """
    params = random_profiles(int(frames.shape[0]), generator, ranges)
    params[:, 7] *= frames.shape[-1] / 64.0
    noise = torch.randn(frames.shape, generator=generator)
    return apply_profiles(frames, params, noise)
