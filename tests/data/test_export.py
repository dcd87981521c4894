"""easy-VQA clips written in MSRVTT's published formats read back through the dataset readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stablesynth.data.easyvqa import COLORS, SHAPES, load_easyvqa
from stablesynth.data.export import MP4_CODECS, NEUTRAL, easyvqa_scenes, export_msrvtt, mc_options, render_scene
from stablesynth.data.msrvtt_formats import read_msrvtt_mc, read_msrvtt_retrieval
from stablesynth.data.qa_formats import read_msrvtt_qa
from stablesynth.data.video import read_frames


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pick_codec) -> tuple[Path, dict]:
    codec = pick_codec(MP4_CODECS)  # skips without an mp4 encoder
    root = tmp_path_factory.mktemp("export")
    return root, export_msrvtt(root, n_train=6, n_val=2, n_test=30, frames=3, size=32, codec=codec)


def _captions(root: Path) -> dict[str, str]:
    data = json.loads((root / "annotation" / "MSR_VTT.json").read_text())
    return {a["image_id"]: a["caption"] for a in data["annotations"]}


def test_retrieval_files_read_back_with_one_video_per_test_caption(exported):
    root, summary = exported
    train = read_msrvtt_retrieval(root, "train")
    test = read_msrvtt_retrieval(root, "test")
    assert len(train) == 6 and summary["videos"] == {"train": 6, "val": 2, "test": 30}
    assert len(test) == summary["retrieval_test"] == len(COLORS) * len(SHAPES)
    assert len({r.caption for r in test}) == len(test)
    assert not {r.video_id for r in train} & {r.video_id for r in test}
    assert {r.category for r in train + test} <= set(range(4))
    assert all(r.media_path.is_file() for r in train + test)


def test_mc_distractors_share_the_clip_shape(exported):
    root, summary = exported
    items = read_msrvtt_mc(root)
    captions = _captions(root)
    assert len(items) == summary["mc_items"] == 30
    for it in items:
        right = it.options[it.answer]
        assert right == captions[it.video_id] and len(set(it.options)) == 5
        shape = right.split()[-1]
        assert all(o.split()[-1] == shape for o in it.options)


def test_mc_options_mix_colour_and_shape_distractors():
    scene = easyvqa_scenes(load_easyvqa(), "test")[0]
    options, answer = mc_options(scene, np.random.default_rng(0), same_colour=2)
    assert options[answer] == scene.caption
    others = [o for i, o in enumerate(options) if i != answer]
    assert sum(o.split()[1] == scene.colour for o in others) == 2
    assert sum(o.split()[-1] == scene.shape for o in others) == 2


def test_qa_files_use_the_scene_questions(exported):
    root, summary = exported
    train = read_msrvtt_qa(root, "train")
    test = read_msrvtt_qa(root, "test", vocab=train.vocab)
    assert len(read_msrvtt_qa(root, "val")) == summary["questions"]["val"] > 0
    assert len(train) == summary["questions"]["train"] and test.num_out_of_vocab == 0
    assert len(train.vocab) == summary["answers"] == 13
    captions = _captions(root)
    for r in train.records:
        if r.question == "what color is the shape?":
            assert captions[r.video_id].split()[1] == r.answer
    assert 0 < summary["qa_chance"] < 1


def test_videos_decode_to_the_caption_colour(exported):
    root, _ = exported
    rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    checked = 0
    for vid, cap in _captions(root).items():
        colour = cap.split()[1]
        if colour not in rgb:
            continue
        frames = read_frames(root / "videos" / "all" / f"{vid}.mp4", 3)
        assert frames.shape == (3, 32, 32, 3)
        pixels = frames.reshape(-1, 3).astype(int)
        shape = pixels[np.abs(pixels - NEUTRAL).sum(axis=1) > 150]
        assert len(shape) > 0.1 * len(pixels), (vid, cap)
        assert np.abs(np.median(shape, axis=0) - rgb[colour]).max() < 40, (vid, cap)
        checked += 1
    assert checked > 0


def test_render_scene_zooms_onto_the_shape_on_a_neutral_background():
    data = load_easyvqa()
    img = data.test.images[0].permute(1, 2, 0).numpy()
    out = render_scene(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out[0, 0].astype(int) - NEUTRAL).max() <= 2
    assert (render_scene(img, 64, zoom=False, background="original") == img).all()
    with pytest.raises(ValueError, match="background"):
        render_scene(img, 32, background="white")
