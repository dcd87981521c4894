"""Recall with repeated captions, its chance level, and multiple choice from one score matrix."""

from __future__ import annotations

import torch

from stablesynth.evaluation.caption_metrics import (
    caption_recall,
    caption_recall_chance,
    mc_hits,
    text_to_video_ranks,
    video_to_text_ranks,
)


def test_perfect_scores_find_everything_and_ties_count_against():
    caps = torch.tensor([0, 1, 1, 2])
    sim = torch.nn.functional.one_hot(caps, 4).double()
    assert all(v == 1.0 for v in caption_recall(sim, caps).values())
    flat = torch.zeros(4, 4, dtype=torch.float64)
    r = caption_recall(flat, caps, ks=(1,))
    assert r == {"VR@1": 0.0, "TR@1": 0.0}


def test_a_caption_is_found_by_any_of_its_clips():
    caps = torch.tensor([0, 0, 1])
    sim = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.5, 0.8]])
    assert text_to_video_ranks(sim, caps) == {0: 0, 1: 0}
    assert video_to_text_ranks(sim, caps).tolist() == [0, 0, 0]
    sim[2, 0] = 0.95  # a wrong clip now outranks caption 0's best clip
    assert text_to_video_ranks(sim, caps)[0] == 1


def test_chance_matches_random_scores():
    gen = torch.Generator().manual_seed(0)
    caps = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5, 5, 5, 5])
    runs = [caption_recall(torch.rand(len(caps), 8, generator=gen, dtype=torch.float64), caps) for _ in range(3000)]
    chance = caption_recall_chance(caps, 8)
    for key, expected in chance.items():
        observed = sum(r[key] for r in runs) / len(runs)
        assert abs(observed - expected) < 0.02, (key, observed, expected)


def test_mc_hits_read_the_candidate_columns():
    sim = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.9, 0.1, 0.3, 0.0]])
    options = torch.tensor([[2, 1], [1, 0]])
    assert mc_hits(sim, options, torch.tensor([1, 1])).tolist() == [True, True]
    assert mc_hits(sim, options, torch.tensor([0, 0])).tolist() == [False, False]
