"""Captions of the benchmark's clips and the (clip, caption) rows of multiple choice and retrieval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablesynth.data.captions import (
    CAPTIONS,
    CaptionPairs,
    PairBatches,
    caption_texts,
    distractors,
    image_captions,
    mc_candidates,
)
from stablesynth.data.easyvqa import SHAPES


@pytest.fixture(scope="module")
def pairs(tiny_bench) -> CaptionPairs:
    return CaptionPairs(tiny_bench, clips_per_device=4, same_colour=2, seed=0)


def test_captions_are_every_colour_and_shape_once():
    texts = caption_texts()
    assert len(texts) == len(set(texts)) == 24
    assert texts[0] == "a red circle" and CAPTIONS[len(SHAPES)] == ("green", "circle")


def test_image_captions_agree_with_the_scene_questions(tiny_bench):
    data = tiny_bench.data
    caps = image_captions(data, "test")
    src = data.test
    checked = 0
    for q, a, img in zip(src.questions, src.answer.tolist(), src.image.tolist(), strict=True):
        if q.startswith("what color") and int(caps[img]) >= 0:
            assert CAPTIONS[int(caps[img])][0] == data.answers[a]
            checked += 1
    assert checked > 100
    assert (caps >= 0).float().mean() > 0.85  # the rest: questions that leave colour or shape open


def test_distractors_share_the_colour_or_the_shape():
    rng = np.random.default_rng(0)
    for true in range(len(CAPTIONS)):
        colour, shape = CAPTIONS[true]
        out = distractors(true, rng, same_colour=2, n=4)
        assert true not in out and len(set(out)) == 4
        assert sum(CAPTIONS[c][0] == colour for c in out) == 2
        assert sum(CAPTIONS[c][1] == shape for c in out) == 2
    options, answer = mc_candidates(5, np.random.default_rng(1))
    assert options[answer] == 5 and len(options) == 5


def test_history_rows_pair_each_clip_with_its_caption_and_one_distractor(pairs):
    rows = pairs.rows["history"]
    assert len(rows) % 2 == 0
    assert (rows[0::2, 2] == 1).all() and (rows[1::2, 2] == 0).all()
    assert (rows[0::2, 0] == rows[1::2, 0]).all()
    assert (rows[0::2, 1] == pairs.clip_caption["history"][rows[0::2, 0]]).all()
    assert (rows[1::2, 1] != rows[0::2, 1]).all()


def test_realtime_rows_score_each_session_start_against_every_caption(pairs, tiny_bench):
    rows = pairs.rows["realtime"]
    clips = pairs.test_clip_rows
    assert len(rows) == len(clips) * 24 and len(clips) == 4 * len(tiny_bench.devices)
    assert (rows.view(len(clips), 24, 3)[:, :, 2].sum(dim=1) == 1).all()  # one right caption per clip
    table = tiny_bench.splits["realtime"]
    captioned = pairs.clip_caption["realtime"] >= 0
    for d in tiny_bench.devices:
        first = torch.nonzero((table.device == d.id) & captioned).flatten()[:4]
        assert first.tolist() == clips[table.device[clips] == d.id].tolist()
    options, answers = pairs.mc_items()
    caps = pairs.clip_caption["realtime"][clips]
    assert (options[torch.arange(len(clips)), answers] == caps).all()


def test_batches_render_each_clip_once_with_the_caption_text(pairs, tiny_bench):
    index = pairs.select("history", "train")[:6]
    batch = PairBatches(pairs, "history", index, batch_size=4)[0]
    assert batch["frames"].shape == (4, tiny_bench.cfg.frames_per_clip, 3, 16, 16)
    assert torch.equal(batch["frames"][0], batch["frames"][1])  # one clip, two captions
    assert batch["label"].tolist()[:2] == [1, 0]
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    held = torch.isin(pairs.rows["history"][pairs.select("history", "train"), 0], tiny_bench.validation_rows())
    assert not held.any()
