"""Write easy-VQA scenes as a video dataset folder in MSRVTT's published formats.

:func:`export_msrvtt` turns easy-VQA images into short clips (``frames`` jittered
copies of the scene, encoded with PyAV) and writes exactly the files that
:mod:`stablesynth.data.msrvtt_formats` and :mod:`stablesynth.data.qa_formats` read from
a user's MSRVTT download::

    videos/all/<video_id>.mp4                        the clips
    annotation/MSR_VTT.json                          videos (video_id, category, split) + captions
    train_list_jsfusion.txt, val_list_jsfusion.txt   retrieval train / test video ids
    msrvtt_mc_test.jsonl                             multiple choice over the test videos
    msrvtt_qa_{train,val,test}.jsonl                 easy-VQA's own questions about each clip
    msrvtt_train_ans2label.json                      easy-VQA's 13 answers → label

Every easy-VQA image shows one coloured shape, and its questions reveal the colour and
the shape (:func:`easyvqa_scenes`), so each clip gets the caption "a <colour> <shape>"
(8 colours × 3 shapes = 24 captions). The test videos are drawn so that the first 24
cover every (colour, shape) once; the retrieval test list holds just those, so each test
caption belongs to exactly one test video and the diagonal is the only right answer
(chance R@1 = 1 / len(val list)). A multiple-choice item's four distractors share the
clip's colour (``mc_same_colour`` of them, at most 2) or its shape (the others), so no
distractor is told apart by a cue the clip does not show. The train and val videos come
from easy-VQA's train images, the test videos from its test images. Everything is drawn
from ``seed``.

Rendering (:func:`render_scene`). By default a clip is a close-up of the shape (``zoom``:
easy-VQA's shapes are often a few pixels once a CPU encoder resizes the frame to 16 or
32 px) on a neutral background (``background="neutral"``: :data:`NEUTRAL`, the DeiT mean
that input normalisation maps to 0). The scenes' pale backgrounds are about +2 after
normalisation, an offset common to every clip that LayerNorm then divides the colour
signal by; with them, a from-scratch encoder did not learn caption ↔ clip matching within
thousands of steps, and with the neutral background it does within a few hundred.
``zoom=False, background="original"`` writes the scenes as they are.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stablesynth.data.captions import CAPTIONS, MC_CANDIDATES, caption, caption_index, mc_candidates
from stablesynth.data.easyvqa import COLORS, SHAPES, EasyVQA, load_easyvqa, scene_attributes

#: mp4 encoders tried in order: MPEG-4 Part 2 decodes about twice as fast as H.264 (MSRVTT's own
#: codec, which ``codec="libx264"`` writes) and is in every FFmpeg build.
MP4_CODECS: tuple[str, ...] = ("mpeg4", "libx264", "h264")
#: Background of a rendered clip: the DeiT mean colour, which the encoder's input normalisation maps to 0.
NEUTRAL: tuple[int, int, int] = (124, 116, 104)


@dataclass(frozen=True)
class Scene:
    """One easy-VQA image: its index in the split, what it shows, and its questions (question, answer)."""

    image: int
    colour: str
    shape: str
    questions: tuple[tuple[str, str], ...]

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)


def easyvqa_scenes(data: EasyVQA, split: str) -> list[Scene]:
    """The split's images whose colour and shape their questions tell
    (:func:`~stablesynth.data.easyvqa.scene_attributes`), in image order."""
    src = data.split(split)
    colour, shape = scene_attributes(data, split)
    qs: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(src.questions, src.answer.tolist(), src.image.tolist(), strict=True):
        qs.setdefault(int(i), []).append((q, data.answers[a]))
    return [Scene(i, COLORS[int(colour[i])], SHAPES[int(shape[i])], tuple(qs[i]))
            for i in sorted(qs) if int(colour[i]) >= 0 and int(shape[i]) >= 0]


def pick_codec(names: Sequence[str] = MP4_CODECS) -> str:
    """The first of ``names`` this PyAV build can encode with."""
    import av

    for name in names:
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        return name
    raise RuntimeError(f"none of the video encoders {list(names)} is built into this PyAV")


def write_mp4(path: Path, frames: Sequence[np.ndarray], codec: str, fps: int = 4, pix_fmt: str = "yuv420p") -> Path:
    """Encode RGB uint8 frames ``[H, W, 3]`` (even H, W for yuv420p) into a video at ``path`` (folder created)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 2_000_000
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        out.mux(stream.encode())
    return path


def _background(image: np.ndarray) -> np.ndarray:
    """The scene's background colour: the median of its four corner pixels."""
    corners = np.stack([image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]).astype(np.int32)
    return np.median(corners, axis=0)


def shape_mask(image: np.ndarray, threshold: int = 40) -> np.ndarray:
    """bool ``[H, W]``: the pixels of the scene's shape (unlike the background corners)."""
    return np.abs(image.astype(np.int32) - _background(image)).sum(axis=-1) > threshold


def render_scene(image: np.ndarray, size: int, zoom: bool = True, background: str = "neutral",
                 margin: float = 0.25) -> np.ndarray:
    """One easy-VQA scene (uint8 ``[H, W, 3]``) as a ``size`` px frame.

    ``zoom``: crop to the square around the shape, ``margin`` of its side added on every side
    (clipped to the image), so a small shape is not a few pixels after the encoder's resize.
    ``background``: ``"neutral"`` paints the pale background in :data:`NEUTRAL`, ``"original"``
    keeps it (see the module docstring for why the default is neutral).
    """
    if background not in ("neutral", "original"):
        raise ValueError(f"background must be 'neutral' or 'original', got {background!r}")
    mask = shape_mask(image)
    if background == "neutral":
        image = np.where(mask[..., None], image, np.array(NEUTRAL, dtype=np.uint8)).astype(np.uint8)
    if zoom and mask.any():
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (1 + 2 * margin)
        side = int(min(max(side, 8), h, w))
        top = int(np.clip(round(cy - side / 2), 0, h - side))
        left = int(np.clip(round(cx - side / 2), 0, w - side))
        image = image[top:top + side, left:left + side]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return image


def clip_frames(image: np.ndarray, frames: int, rng: np.random.Generator, shift: int = 2,
                noise: float = 4.0) -> list[np.ndarray]:
    """``frames`` copies of the uint8 ``[H, W, 3]`` scene, each shifted a few pixels, with a little noise."""
    out = []
    h, w = image.shape[:2]
    padded = np.pad(image, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
    for _ in range(frames):
        dy, dx = (int(v) for v in rng.integers(0, 2 * shift + 1, size=2))
        crop = padded[dy:dy + h, dx:dx + w].astype(np.float32)
        crop += rng.normal(0.0, noise, crop.shape)
        out.append(np.clip(crop, 0, 255).astype(np.uint8))
    return out


def _test_order(scenes: list[Scene], rng: np.random.Generator) -> list[Scene]:
    """Scenes shuffled so that the first ones cover every (colour, shape) once, then the rest."""
    order = [scenes[i] for i in rng.permutation(len(scenes))]
    first: dict[tuple[str, str], Scene] = {}
    for s in order:
        first.setdefault((s.colour, s.shape), s)
    head = [first[k] for k in CAPTIONS if k in first]
    head = [head[i] for i in rng.permutation(len(head))]
    chosen = {id(s) for s in head}
    return head + [s for s in order if id(s) not in chosen]


def mc_options(scene: Scene, rng: np.random.Generator, same_colour: int = 0,
               candidates: int = MC_CANDIDATES) -> tuple[list[str], int]:
    """The clip's caption among distractors that share its colour (``same_colour``) or its shape
    (:func:`~stablesynth.data.captions.mc_candidates`, as sentences)."""
    options, answer = mc_candidates(caption_index(scene.colour, scene.shape), rng, same_colour, candidates)
    return [caption(*CAPTIONS[o]) for o in options], answer


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def export_msrvtt(root: str | Path, *, n_train: int = 240, n_val: int = 0, n_test: int = 24,
                  frames: int = 4, size: int = 64, zoom: bool = True,
                  background: str = "neutral", categories: int = 4, mc_same_colour: int = 0,
                  seed: int = 0, codec: str | None = None, data: EasyVQA | None = None) -> dict[str, Any]:
    """Write easy-VQA clips under ``root`` in MSRVTT's formats (see the module docstring).

    Train (and val) videos come from easy-VQA's train images, test videos from its test
    images. ``size`` is the frame size written (easy-VQA scenes are 64 px); the video's
    category (the run's device) is its position modulo ``categories``. Returns a summary:
    the counts, the codec, the retrieval test size and the chance levels.
    """
    if n_train < 1 or n_test < 2 or n_val < 0 or frames < 1 or categories < 1:
        raise ValueError("need n_train >= 1, n_test >= 2, n_val >= 0, frames >= 1, categories >= 1")
    if size < 2 or size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    root = Path(root)
    data = data or load_easyvqa()
    codec = codec or pick_codec()
    rng = np.random.default_rng(seed)
    train_scenes = easyvqa_scenes(data, "train")
    train_scenes = [train_scenes[i] for i in rng.permutation(len(train_scenes))]
    test_scenes = _test_order(easyvqa_scenes(data, "test"), rng)
    if n_train + n_val > len(train_scenes) or n_test > len(test_scenes):
        raise ValueError(f"easy-VQA has {len(train_scenes)} train / {len(test_scenes)} test scenes")
    splits = {"train": (train_scenes[:n_train], data.train),
              "val": (train_scenes[n_train:n_train + n_val], data.train),
              "test": (test_scenes[:n_test], data.test)}

    videos, anns, ids = [], [], {}
    qa: dict[str, list[dict[str, Any]]] = {}
    mc = []
    for split, (scenes, source) in splits.items():
        ids[split], qa[split] = [], []
        for scene in scenes:
            vid = f"video{len(videos)}"
            img = render_scene(source.images[scene.image].permute(1, 2, 0).numpy(), size, zoom, background)
            write_mp4(root / "videos" / "all" / f"{vid}.mp4", clip_frames(img, frames, rng), codec)
            videos.append({"video_id": vid, "category": len(videos) % categories, "split": split,
                           "easyvqa_split": source.name, "easyvqa_image": scene.image})
            anns.append({"image_id": vid, "caption": scene.caption, "id": len(anns)})
            ids[split].append(vid)
            for q, a in scene.questions:
                qa[split].append({"question": q, "answer": a, "video_id": vid, "id": len(qa[split])})
            if split == "test":
                options, answer = mc_options(scene, rng, mc_same_colour)
                mc.append({"clip_name": vid, "options": options, "answer": answer, "qid": len(mc)})

    # The retrieval test list: the head of the test videos, one per caption.
    ret_test = ids["test"][:len(CAPTIONS)]
    (root / "annotation").mkdir(parents=True, exist_ok=True)
    (root / "annotation" / "MSR_VTT.json").write_text(
        json.dumps({"info": {"description": "easy-VQA scenes in MSRVTT's format"}, "videos": videos,
                    "annotations": anns}), encoding="utf-8")
    (root / "train_list_jsfusion.txt").write_text("".join(v + "\n" for v in ids["train"]), encoding="utf-8")
    (root / "val_list_jsfusion.txt").write_text("".join(v + "\n" for v in ret_test), encoding="utf-8")
    _write_jsonl(root / "msrvtt_mc_test.jsonl", mc)
    for split, rows in qa.items():
        _write_jsonl(root / f"msrvtt_qa_{split}.jsonl", rows)
    # easy-VQA's 13 answers in its own order (a few train clips need not use them all).
    (root / "msrvtt_train_ans2label.json").write_text(
        json.dumps({a: i for i, a in enumerate(data.answers)}), encoding="utf-8")
    return {
        "root": str(root), "codec": codec, "videos": {k: len(v) for k, v in ids.items()},
        "questions": {k: len(v) for k, v in qa.items()}, "answers": len(data.answers),
        "mc_items": len(mc), "mc_chance": 1 / 5, "retrieval_test": len(ret_test),
        "retrieval_chance_r1": 1 / len(ret_test),
        "qa_chance": _prior_accuracy(qa["train"], qa["test"]),
    }


def _prior_accuracy(train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]]) -> float:
    """Test accuracy of always giving the train split's most frequent answer (open-ended chance)."""
    if not train or not test:
        return 0.0
    prior = Counter(r["answer"] for r in train).most_common(1)[0][0]
    return sum(r["answer"] == prior for r in test) / len(test)
