from pathlib import Path

import numpy as np
import pytest
import torch

from stablesynth.config import ConfigError
from stablesynth.data.annotation_records import MCRecord, QARecord
from stablesynth.data.video import (
    DEIT_MEAN,
    DEIT_STD,
    VideoDecodeError,
    count_frames,
    preprocess,
    read_clip,
    read_frame_folder,
    read_frames,
    sample_indices,
)
from stablesynth.data.video_dataset import (
    CLIP_KEYS,
    VideoDatasetConfig,
    VideoMCDataset,
    VideoQADataset,
    collate_clips,
    hash_bucket,
)
from stablesynth.presets import get_preset

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)


def write_clip(path: Path, write_frames, codec: str, pix_fmt: str, size: int = 32) -> Path:
    return write_frames(path, [np.broadcast_to(c, (size, size, 3)).copy() for c in COLOURS], codec, pix_fmt)


def mean_colours(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(frames.shape[0], -1, 3).mean(axis=1)


def assert_colour_order(frames: np.ndarray, expected_idx: list[int], tol: float = 20.0) -> None:
    got = mean_colours(frames)
    assert np.abs(got - COLOURS[expected_idx]).max() < tol, got


@pytest.fixture(scope="module")
def clips(tmp_path_factory, pick_codec, write_frames):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_clip(d / "c.mp4", write_frames, pick_codec(["libx264", "h264", "mpeg4"]), "yuv420p"),
        "avi": write_clip(d / "c.avi", write_frames, pick_codec(["mpeg4", "mjpeg"]), "yuv420p"),
        "gif": write_clip(d / "c.gif", write_frames, pick_codec(["gif"]), "rgb8"),
        "webm": write_clip(d / "c.webm", write_frames, pick_codec(["libvpx-vp9", "libvpx"]), "yuv420p"),
    }


@pytest.mark.parametrize("kind", ["mp4", "avi", "gif", "webm"])
def test_decode_count_colours_order(clips, kind):
    path = clips[kind]
    assert count_frames(path) == 4
    all4 = read_frames(path, 4)
    assert all4.shape == (4, 32, 32, 3) and all4.dtype == np.uint8
    assert_colour_order(all4, [0, 1, 2, 3])
    # Uniform: middle of 3 equal segments of 4 frames → 0, 2, 3.
    assert_colour_order(read_frames(path, 3), [0, 2, 3])
    # Shorter clip than requested: frames repeat, order kept.
    assert_colour_order(read_frames(path, 6), [0, 1, 1, 2, 3, 3])


def test_random_mode_is_seeded_and_ordered(clips):
    a = read_frames(clips["mp4"], 2, mode="random", rng=np.random.default_rng(3))
    b = read_frames(clips["mp4"], 2, mode="random", rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    idx = sample_indices(100, 5, "random", np.random.default_rng(0))
    assert idx == sorted(idx) and all(20 * i <= j < 20 * (i + 1) for i, j in enumerate(idx))


def test_sample_indices_uniform_and_errors():
    assert sample_indices(10, 5) == [1, 3, 5, 7, 9]
    assert sample_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="mode"):
        sample_indices(10, 3, "middle")
    with pytest.raises(ValueError):
        sample_indices(0, 3)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        read_frames(tmp_path / "missing.mp4", 3)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoDecodeError, match=r"bad\.mp4"):
        read_frames(bad, 3)


def test_frame_folder(tmp_path):
    from PIL import Image

    for i, colour in enumerate(COLOURS):
        # Numeric order must win over string order (frame_10 after frame_2).
        img = Image.fromarray(np.broadcast_to(colour, (8, 8, 3)).copy())
        img.save(tmp_path / f"frame_{[1, 2, 10, 11][i]}.png")
    frames = read_frame_folder(tmp_path, 4)
    assert_colour_order(frames, [0, 1, 2, 3], tol=1)
    assert read_clip(tmp_path, 2).shape == (2, 8, 8, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoDecodeError, match="no image files"):
        read_frame_folder(empty, 3)


def test_preprocess_resizes_and_normalises():
    frames = np.broadcast_to(COLOURS[:, None, None, :], (4, 10, 12, 3)).copy()
    x = preprocess(frames, 16)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(DEIT_MEAN)) / torch.tensor(DEIT_STD)
    assert torch.allclose(x[0, :, 5, 5], red, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(frames.astype(np.float32), 16)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        preprocess(frames[0], 16)


# ---------------------------------------------------------------- datasets over decoded clips


def fake_encode(texts, max_length):
    # Deterministic stand-in for the BERT tokenizer: one id per word, padded.
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    for i, t in enumerate(texts):
        toks = [sum(map(ord, w)) % 1000 + 1 for w in t.split()][:max_length]
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids, (ids != 0).long()


def test_qa_dataset_items_and_collate(clips):
    recs = [
        QARecord(0, "video1", clips["mp4"], "what colour?", "red", 3, question_type=2, category=7),
        QARecord(1, "tumblr_x", clips["gif"], "what is it?", "dog", -100),
    ]
    cfg = VideoDatasetConfig(num_frames=3, global_frames=2, image_size=16, text_len=8, seed=1)
    ds = VideoQADataset(recs, fake_encode, cfg)
    item = ds[0]
    assert set(item) == set(CLIP_KEYS)
    assert item["frames"].shape == (3, 3, 16, 16) and item["frames"].dtype == torch.float32
    assert item["input_ids"].shape == (8,) and int(item["attention_mask"].sum()) == 2
    assert int(item["label"]) == 3 and int(item["question_type"]) == 2
    assert int(item["device"]) == 7  # the MSRVTT category
    assert int(ds[1]["device"]) == hash_bucket("tumblr_x", 20) and int(ds[1]["label"]) == -100
    assert 0 <= int(item["upload_index"]) < 3
    g = item["global_index"]
    assert g.shape == (2,) and g.tolist() == sorted(set(g.tolist()))
    # Frame choices are fixed at build time: the same seed gives the same choices.
    again = VideoQADataset(recs, fake_encode, cfg)[0]
    assert torch.equal(again["upload_index"], item["upload_index"]) and torch.equal(again["global_index"], g)
    batch = collate_clips([ds[0], ds[1]])
    assert batch["frames"].shape == (2, 3, 3, 16, 16) and batch["global_index"].shape == (2, 2)
    assert batch["label"].tolist() == [3, -100]
    # The first decoded frame of the mp4 is red: normalised red channel is high, blue low.
    assert batch["frames"][0, 0, 0].mean() > 1.5 and batch["frames"][0, 0, 2].mean() < -1.0


def test_device_grouping_options():
    assert hash_bucket("video1", 20) == hash_bucket("video1", 20) < 20
    assert len({hash_bucket(f"video{i}", 8) for i in range(200)}) == 8
    recs = [QARecord(0, "video1", Path("x.mp4"), "q", "a", 0)]
    with pytest.raises(ValueError, match="no category"):
        VideoQADataset(recs, fake_encode, VideoDatasetConfig(device_by="category"))
    with pytest.raises(ConfigError, match="global_frames"):
        VideoDatasetConfig.from_dict({"num_frames": 2, "global_frames": 3})
    cfg = VideoDatasetConfig.from_preset(get_preset("msrvtt-qa"))
    assert (cfg.num_frames, cfg.image_size, cfg.text_len) == (3, 224, 40)


def test_missing_media_is_a_clear_error(tmp_path):
    recs = [QARecord(0, "video1", tmp_path / "videos" / "all" / "video1.mp4", "q", "a", 0)]
    ds = VideoQADataset(recs, fake_encode, VideoDatasetConfig(image_size=8))
    with pytest.raises(FileNotFoundError, match="video1"):
        ds[0]


def test_mc_dataset_rows(clips):
    items = [
        MCRecord(0, "video7010", clips["mp4"], ("a man sings", "a dog", "cars", "food", "rain"), answer=1),
        MCRecord(1, "video7011", clips["avi"], ("x", "y", "z", "w", "v"), answer=4, question="what?"),
    ]
    seen_texts = []

    def recording_encode(texts, max_length):
        seen_texts.extend(texts)
        return fake_encode(texts, max_length)

    ds = VideoMCDataset(items, recording_encode, VideoDatasetConfig(image_size=8, text_len=6))
    assert len(ds) == 10
    rows = [ds[i] for i in range(len(ds))]
    batch = collate_clips(rows)
    assert batch["group"].tolist() == [0] * 5 + [1] * 5
    assert batch["candidate"].tolist() == [0, 1, 2, 3, 4] * 2
    assert batch["label"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert batch["sample_id"].tolist() == list(range(10))
    assert seen_texts[1] == "a dog" and seen_texts[5] == "what? [SEP] x"
    # All candidates of one item share the clip and the uploaded frame.
    assert torch.equal(batch["frames"][0], batch["frames"][4])
    assert len(set(batch["upload_index"][:5].tolist())) == 1
    assert ds.answers.tolist() == [1, 4]
