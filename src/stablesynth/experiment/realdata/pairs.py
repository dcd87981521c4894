"""Clip batches, and (clip, text) pair tasks (multiple choice, retrieval) scored by the K = 1 head."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stablesynth.data.annotation_files import DatasetFormatError, read_jsonl
from stablesynth.data.annotation_records import MCRecord, QARecord, RetrievalRecord
from stablesynth.data.batch import FeatureBatch
from stablesynth.data.msrvtt_formats import read_msrvtt_categories
from stablesynth.data.video_dataset import VideoMCDataset, VideoQADataset, collate_clips
from stablesynth.evaluation.metrics import accuracy_block, mc_accuracy, retrieval_metrics, rows_to_candidates
from stablesynth.methods import Method
from stablesynth.methods.pairs import pair_scores

# ---------------------------------------------------------------------------------------------
# clips


class ClipBatches(Sequence):
    """Batches of a clip dataset, decoded when indexed (so skipped batches cost nothing)."""

    def __init__(self, dataset: VideoQADataset, index_batches: list[list[int]]) -> None:
        self.dataset = dataset
        self.index_batches = index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return collate_clips([self.dataset[j] for j in self.index_batches[i]])


def _chunks(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [indices[s:s + size] for s in range(0, len(indices), size)]
    if drop_last and len(out) > 1 and len(out[-1]) < size:
        out.pop()
    return out


def _records_digest(records: Sequence[QARecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.video_id}\t{r.question}\t{r.label}\t{r.media_path.name}\n".encode())
    return h.hexdigest()[:16]


def _dataset_digest(ds: VideoQADataset) -> str:
    if not isinstance(ds, VideoMCDataset):
        return _records_digest(ds.records)
    h = hashlib.sha256()
    for r in ds.items:
        h.update(f"{r.video_id}\t{r.question}\t{r.answer}\t{r.media_path.name}\t".encode())
        h.update("\x1f".join(r.options).encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# multiple choice and retrieval: (clip, text) pairs scored by the K = 1 head (methods/pairs.py);
# the highest-scoring candidate of a multiple-choice item wins, retrieval ranks videos per caption
# and captions per video.


def _cap(items: list, n: int) -> list:
    return items[:n] if n else items


def negative_sampled_items(pairs: Sequence[RetrievalRecord], negatives: int, seed: int) -> list[MCRecord]:
    """Each (video, caption) pair as one item: its caption among ``negatives`` captions of other videos.

    A negative is never a caption of the pair's own video (the same sentence often
    describes several videos; it would be a positive labelled 0). The negatives and the
    right caption's position are drawn from ``seed`` and the pair's sample id, so every run
    (train and eval) builds the same items.
    """
    own: dict[str, set[str]] = {}
    for p in pairs:
        own.setdefault(p.video_id, set()).add(p.caption)
    items: list[MCRecord] = []
    for p in pairs:
        rng = np.random.default_rng([seed, p.sample_id])
        negs: list[str] = []
        for _ in range(1000 * negatives):
            other = pairs[int(rng.integers(len(pairs)))]
            if other.caption not in own[p.video_id]:
                negs.append(other.caption)
                if len(negs) == negatives:
                    break
        else:
            raise DatasetFormatError(f"training pairs: no negative caption for video {p.video_id!r} (every "
                                     "caption drawn describes it too; negatives need other videos' captions)")
        pos = int(rng.integers(negatives + 1))
        options = (*negs[:pos], p.caption, *negs[pos:])
        items.append(MCRecord(sample_id=len(items), video_id=p.video_id, media_path=p.media_path,
                              options=options, answer=pos, category=p.category))
    return items


def all_pairs_items(pairs: Sequence[RetrievalRecord]) -> list[MCRecord]:
    """Retrieval test: item v = video v with every test caption as a candidate (caption v is its own)."""
    captions = tuple(p.caption for p in pairs)
    return [MCRecord(sample_id=i, video_id=p.video_id, media_path=p.media_path, options=captions, answer=i,
                     category=p.category) for i, p in enumerate(pairs)]


def read_mc_items(path: Path, media_root: Path, annotation_dir: Path) -> list[MCRecord]:
    """Multiple-choice items in MSRVTT-MC's JSON-lines format from any file (``train_from``)."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: train_from file not found")
    cats = read_msrvtt_categories(annotation_dir)
    items: list[MCRecord] = []
    for n, o in read_jsonl(path):
        clip, options, answer = o.get("clip_name"), o.get("options"), o.get("answer")
        if not isinstance(clip, str) or not isinstance(options, list) or len(options) < 2 \
                or not all(isinstance(x, str) for x in options):
            raise DatasetFormatError(f"{path}:{n}: needs 'clip_name' and 'options' (>= 2 strings)")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise DatasetFormatError(f"{path}:{n}: 'answer' must be an index into 'options', got {answer!r}")
        question = o.get("question", "")
        items.append(MCRecord(sample_id=len(items), video_id=clip,
                              media_path=media_root / "videos" / "all" / f"{clip}.mp4", options=tuple(options),
                              answer=answer, question=question if isinstance(question, str) else "",
                              category=cats.get(clip)))
    return items


def evaluate_pairs(method: Method, realtime: FeatureBatch, ds: VideoMCDataset, seen: set[int], task: str,
                   batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score every test row, gather the scores per item, and return (accuracy blocks, task metrics).

    Multiple choice: an item is right when its correct candidate has the highest score.
    Retrieval: the [videos × captions] score matrix gives VR@K / TR@K; the per-device
    "accuracy" is text → video R@1 over the captions of the device's videos.
    """
    if len(realtime) != len(ds):
        raise RuntimeError(f"{len(realtime)} cached test rows for {len(ds)} dataset rows")
    n_cand = len(ds.items[0].options)
    item_device = torch.tensor(ds.item_devices)
    blocks: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for mode in ("per_sample", "per_session"):
        scores = pair_scores(method, realtime, batch_size, mode)
        matrix = rows_to_candidates(scores, ds.row_group, ds.row_candidate, n_cand)  # [items, candidates]
        if task == "retrieval":
            sim = matrix.T  # [captions, videos]; caption i belongs to video i
            own = sim.diagonal().unsqueeze(1)
            hits = ((sim >= own).sum(dim=1) - 1) < 1  # ties ranked against the caption, as recall_at_k
            metrics[mode] = retrieval_metrics(sim)
        else:
            answers = ds.answers
            hits = matrix.argmax(dim=1) == answers
            metrics[mode] = mc_accuracy(matrix, answers)
        per_dev = {int(d): float(hits[item_device == d].double().mean()) for d in item_device.unique().tolist()}
        blocks[mode] = accuracy_block(per_dev, seen)
    return blocks, metrics
