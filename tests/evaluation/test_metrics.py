import math

import pytest
import torch

from stablesynth.evaluation.metrics import (
    accuracy,
    accuracy_by_device,
    mc_accuracy,
    per_device_summary,
    recall_at_k,
    retrieval_metrics,
    rows_to_candidates,
)


def test_accuracy_from_logits_and_predictions():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 1, 1, 0])
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert accuracy(torch.tensor([1, 0, 1, 0]), labels) == pytest.approx(0.75)
    assert accuracy([1, 0, 1, 0], [1, 1, 1, 0]) == pytest.approx(0.75)


def test_accuracy_out_of_vocabulary_convention():
    pred = torch.tensor([1, 2, 3, 0])
    labels = torch.tensor([1, 2, -100, -100])
    # All-in-One: unanswerable questions leave the denominator.
    assert accuracy(pred, labels) == pytest.approx(1.0)
    assert accuracy(pred, labels, count_ignored_as_wrong=True) == pytest.approx(0.5)
    assert math.isnan(accuracy(pred, torch.full((4,), -100)))


def test_accuracy_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        accuracy(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.long))


def test_per_device_summary_groups():
    acc = {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.3, 4: float("nan")}
    s = per_device_summary(acc, seen={0, 1})
    assert s["seen"]["n"] == 2 and s["seen"]["mean"] == pytest.approx(0.7)
    assert s["seen"]["worst"] == pytest.approx(0.5) and s["seen"]["std"] == pytest.approx(0.2)
    assert s["unseen"]["n"] == 2 and s["unseen"]["worst"] == pytest.approx(0.3)
    assert s["all"]["n"] == 4 and s["all"]["mean"] == pytest.approx(0.6)
    assert s["all"]["std"] == pytest.approx(torch.tensor([0.9, 0.5, 0.7, 0.3]).std(unbiased=False).item())
    assert s["skipped"] == 1
    empty = per_device_summary({0: 0.5}, seen=set())
    assert empty["seen"]["n"] == 0 and math.isnan(empty["seen"]["mean"])
    assert per_device_summary({0: 0.5}, seen={7})["seen"]["n"] == 0


def test_accuracy_by_device():
    pred = torch.tensor([1, 1, 0, 0, 2])
    labels = torch.tensor([1, 0, 0, -100, 2])
    dev = torch.tensor([0, 0, 1, 1, 2])
    assert accuracy_by_device(pred, labels, dev) == {0: 0.5, 1: 1.0, 2: 1.0}


def test_recall_at_k_hand_made():
    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.0],   # truth ranked 1st
        [0.8, 0.5, 0.1, 0.0],   # truth 2nd
        [0.9, 0.8, 0.7, 0.6],   # truth 3rd
        [0.9, 0.8, 0.7, 0.1],   # truth 4th
    ])
    assert recall_at_k(sim, 1) == pytest.approx(0.25)
    assert recall_at_k(sim, 2) == pytest.approx(0.5)
    assert recall_at_k(sim, 3) == pytest.approx(0.75)
    assert recall_at_k(sim, 10) == pytest.approx(1.0)
    # Ties count against the query: a constant matrix is not a perfect retriever.
    assert recall_at_k(torch.zeros(4, 4), 1) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(5, 3), 1)
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(3, 3), 0)


def test_retrieval_metrics_directions():
    # Captions (rows) find their video at rank 1; videos (columns) do not find their caption.
    sim = torch.tensor([
        [1.0, 0.0, 0.0],
        [2.0, 3.0, 0.0],
        [0.0, 0.0, 0.5],
    ])
    m = retrieval_metrics(sim)
    assert set(m) == {"TR@1", "TR@5", "TR@10", "VR@1", "VR@5", "VR@10"}
    assert m["TR@1"] == pytest.approx(1.0)
    assert m["VR@1"] == pytest.approx(2 / 3)  # video 0's best caption is caption 1
    assert m["VR@5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(torch.zeros(2, 3))


def test_mc_accuracy_and_row_grouping():
    logits = torch.tensor([[0.1, 0.2, 0.9, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert mc_accuracy(logits, torch.tensor([2, 3])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="answer_index"):
        mc_accuracy(logits, torch.tensor([2, 5]))
    scores = torch.tensor([0.3, 0.1, 0.9, 0.4])
    group = torch.tensor([1, 0, 0, 1])
    cand = torch.tensor([0, 1, 0, 1])
    grid = rows_to_candidates(scores, group, cand, 2)
    assert torch.allclose(grid, torch.tensor([[0.9, 0.1], [0.3, 0.4]], dtype=torch.float64))
    with pytest.raises(ValueError, match="no score"):
        rows_to_candidates(scores[:3], group[:3], cand[:3], 2)
