"""Video decoding (PyAV), frame sampling and DeiT preprocessing.

Sampling follows All-in-One: the clip is cut into ``num_frames`` equal segments and one
frame is taken from each, the middle one (``uniform``, for evaluation and feature
caching) or a random one (``random``, for training). A clip shorter than
``num_frames`` repeats frames, so every clip yields exactly ``num_frames`` frames in
temporal order. Users with pre-extracted frames use :func:`read_frame_folder`, which
samples the same way over the sorted image files.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# DeiT / ImageNet statistics, which the encoder's DeiT weights were trained with.
DEIT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DEIT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".gif")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SAMPLING_MODES: tuple[str, ...] = ("uniform", "random")


class VideoDecodeError(ValueError):
    """A media file exists but cannot be decoded into frames; the message names the file."""


def sample_indices(total: int, num_frames: int, mode: str = "uniform",
                   rng: np.random.Generator | None = None) -> list[int]:
    """``num_frames`` sorted frame indices in [0, total): one per equal segment of the clip."""
    if total < 1:
        raise ValueError(f"cannot sample from a clip of {total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {list(SAMPLING_MODES)}, got {mode!r}")
    if mode == "uniform":
        return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]
    rng = rng if rng is not None else np.random.default_rng()
    out = []
    for i in range(num_frames):
        start = i * total // num_frames
        end = max(start + 1, (i + 1) * total // num_frames)  # an empty segment (short clip) repeats
        out.append(int(rng.integers(start, end)))
    return out


def _open(path: Path):  # -> av container (av is imported lazily)
    import av

    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoDecodeError(f"{path}: cannot open as a video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: has no video stream")
    return container


def _decode_selected(path: Path, wanted: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode the clip once, keeping RGB arrays of the ``wanted`` indices; returns (frames, frame count)."""
    import av

    keep = set(wanted)
    got: dict[int, np.ndarray] = {}
    count = 0
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in keep:
                got[count] = frame.to_ndarray(format="rgb24")
            count += 1
    except av.error.FFmpegError as exc:
        if count == 0:
            raise VideoDecodeError(f"{path}: cannot decode ({exc})") from None
        # A damaged tail still leaves the decoded prefix usable; sampling then uses that prefix.
    finally:
        container.close()
    return got, count


def count_frames(path: str | Path) -> int:
    """Number of decodable frames in the clip (decodes it: container headers are often wrong)."""
    return _decode_selected(Path(path), [])[1]


def read_frames(path: str | Path, num_frames: int, mode: str = "uniform",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Decode ``num_frames`` frames of an mp4/avi/webm/gif clip: uint8 ``[num_frames, H, W, 3]`` (RGB).

    The container's declared frame count is used to pick frames in a single decoding
    pass; when it is missing or wrong the clip is decoded a second time with the true count.
    """
    import av

    path = Path(path)
    container = _open(path)
    try:
        declared = int(container.streams.video[0].frames or 0)
    except av.error.FFmpegError:
        declared = 0
    finally:
        container.close()
    if declared > 0:
        wanted = sample_indices(declared, num_frames, mode, rng)
        got, count = _decode_selected(path, wanted)
        if count == 0:
            raise VideoDecodeError(f"{path}: no decodable frames")
        if count == declared and all(i in got for i in wanted):
            return np.stack([got[i] for i in wanted])
    else:
        count = count_frames(path)
        if count == 0:
            raise VideoDecodeError(f"{path}: no decodable frames")
    wanted = sample_indices(count, num_frames, mode, rng)
    got, _ = _decode_selected(path, wanted)
    return np.stack([got[i] for i in wanted])


def _natural_key(path: Path) -> list[object]:
    # frame_2.jpg before frame_10.jpg, as extraction tools number them.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def read_frame_folder(directory: str | Path, num_frames: int, mode: str = "uniform",
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Sample ``num_frames`` of a folder of pre-extracted frames (sorted by name, numbers numerically).

    Returns uint8 ``[num_frames, H, W, 3]``; all sampled images must have the same size.
    """
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: frame folder not found")
    files = sorted((p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise VideoDecodeError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    frames = []
    for i in sample_indices(len(files), num_frames, mode, rng):
        try:
            with Image.open(files[i]) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise VideoDecodeError(f"{files[i]}: cannot read image ({exc})") from None
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoDecodeError(f"{directory}: frames have different sizes {sorted(shapes)}")
    return np.stack(frames)


def read_clip(path: str | Path, num_frames: int, mode: str = "uniform",
              rng: np.random.Generator | None = None) -> np.ndarray:
    """A video file or a folder of frames, whichever ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return read_frame_folder(path, num_frames, mode, rng)
    return read_frames(path, num_frames, mode, rng)


def preprocess(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` → float32 ``[N, 3, size, size]``, resized and DeiT-normalised.

    The whole frame is resized to a square (no crop), so nothing a question may ask
    about is cut away; antialiasing keeps downscaled frames faithful.
    """
    t = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB, got {t.dtype}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = t.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(DEIT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEIT_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
