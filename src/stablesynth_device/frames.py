"""A clip's frames on the device: read from images, a ``.npy`` file or a video, checked, normalised.

Every reader returns float32 ``[F, 3, S, S]`` in [0, 1] (the benchmark's frames before
normalisation) at the bundle's image size ``S``; :func:`normalise` then applies the bundle's
mean/std exactly as training did, ``(x − mean) / std`` in float32. Frames of another size or
channel count are refused with the file named: a device that resized silently would feed the
encoder something it was never trained on. A video is the exception, since no camera records
at 32 px: its frames are centre-cropped to a square and resized (bilinear).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablesynth_device.bundle import Preprocessing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
#: More frames than any clip of the encoder's; a larger folder or file is refused before decoding it.
MAX_FRAMES = 64


class FrameError(ValueError):
    """Frames that cannot be a clip for this bundle (the message names the file)."""


def _check(frames: np.ndarray, pre: Preprocessing, where: str) -> np.ndarray:
    s = pre.image_size
    if frames.ndim != 4 or frames.shape[1:] != (3, s, s):
        raise FrameError(f"{where}: frames of shape {list(frames.shape)}, expected [F, 3, {s}, {s}] "
                         f"(or [F, {s}, {s}, 3])")
    if not 1 <= frames.shape[0] <= min(pre.max_frames, MAX_FRAMES):
        raise FrameError(f"{where}: {frames.shape[0]} frames; a clip has 1 to {min(pre.max_frames, MAX_FRAMES)}")
    if not np.isfinite(frames).all():
        raise FrameError(f"{where}: frames hold NaN or Inf")
    if frames.min() < 0 or frames.max() > 1:
        raise FrameError(f"{where}: float frames must lie in [0, 1] (got {frames.min():.3g}..{frames.max():.3g})")
    return np.ascontiguousarray(frames, dtype=np.float32)


def from_array(arr: np.ndarray, pre: Preprocessing, where: str = "frames") -> np.ndarray:
    """[F, 3, S, S] or [F, S, S, 3] frames, uint8 (0–255) or float (0–1), as float32 [F, 3, S, S]."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / np.float32(255.0)
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    else:
        raise FrameError(f"{where}: frames of dtype {arr.dtype}; use uint8 (0-255) or float (0-1)")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[-1] == 3 and arr.shape[1] != 3:
        arr = arr.transpose(0, 3, 1, 2)
    return _check(arr, pre, where)


def load_npy(path: str | Path, pre: Preprocessing) -> np.ndarray:
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FrameError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise FrameError(f"{path}: not a .npy array ({exc})") from None
    return from_array(arr, pre, str(path))


def load_images(folder: str | Path, pre: Preprocessing) -> np.ndarray:
    """The images of ``folder`` in name order, each an RGB image of the bundle's size."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FrameError(f"{folder}: not a directory of frames")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FrameError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) > min(pre.max_frames, MAX_FRAMES):
        raise FrameError(f"{folder}: {len(files)} images; a clip has at most {min(pre.max_frames, MAX_FRAMES)}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode, size = im.mode, im.size
                if mode != "RGB":
                    raise FrameError(f"{f}: image mode {mode} ({len(im.getbands())} channels); frames must be "
                                     "3-channel RGB")
                if size != (pre.image_size, pre.image_size):
                    raise FrameError(f"{f}: image of {size[0]}x{size[1]} px; this bundle's encoder takes "
                                     f"{pre.image_size}x{pre.image_size}")
                out.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise FrameError(f"{f}: not a readable image ({type(exc).__name__})") from None
    return from_array(np.stack(out), pre, str(folder))


def load_video(path: str | Path, pre: Preprocessing) -> np.ndarray:
    """``frames_per_clip`` evenly spaced frames of a video, centre-cropped and resized (needs PyAV)."""
    path = Path(path)
    try:
        import av
    except ImportError:
        raise FrameError("--video needs PyAV: pip install 'stablesynth-device[video]'") from None
    from PIL import Image

    if not path.is_file():
        raise FrameError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            images = [f.to_image() for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise FrameError(f"{path}: not a readable video ({type(exc).__name__}: {exc})") from None
    if not images:
        raise FrameError(f"{path}: the video has no frames")
    n = min(pre.frames_per_clip, len(images))
    picks = [round(i * (len(images) - 1) / max(n - 1, 1)) for i in range(n)] if n > 1 else [len(images) // 2]
    out = []
    for i in picks:
        im = images[i].convert("RGB")
        side = min(im.size)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((pre.image_size, pre.image_size),
                                                                    Image.Resampling.BILINEAR)
        out.append(np.asarray(im, dtype=np.uint8))
    return from_array(np.stack(out), pre, str(path))


def normalise(frames: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """[F, 3, S, S] in [0, 1] → the encoder's input, ``(x − mean) / std`` per channel in float32."""
    x = _check(np.asarray(frames, dtype=np.float32), pre, "frames")
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std
