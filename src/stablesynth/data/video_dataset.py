"""Torch datasets over the real video QA datasets, yielding the shared clip-loader batches.

Items have the keys of docs/architecture.md "Clip loader batches" (unbatched):
``frames`` float32 [N_f, 3, S, S] (DeiT-normalised), ``input_ids``/``attention_mask``
long [L], ``label``, ``device``, ``question_type``, ``upload_index``, ``sample_id``
(long scalars) and ``global_index`` long [D]; :func:`collate_clips` stacks them.

Devices ("users"). Real datasets have no device ids, so the grouping is a choice
(``VideoDatasetConfig.device_by``):

- ``category``: the MSRVTT video category (0–19) read from ``MSR_VTT.json``; records
  without one are an error;
- ``hash``: a stable bucket of the video id, ``sha1(video_id) mod n_devices``, so all
  questions about one video land on one device, the same on every machine and run;
- ``auto`` (default): the category when the record has one, else the hash bucket.

Frame choices. Each clip decodes N_f = ``num_frames`` frames (uniform sampling by
default, so feature caching and evaluation see the same frames). The uploaded frame
(``upload_index``) and the D frames averaged into F_g (``global_index``) are drawn
from ``seed`` and the sample id when the dataset is built, never per call.

Multiple choice. One row per (question, candidate): the text is
``"question [SEP] candidate"`` (the candidate alone when the item has no question, as
in MSRVTT-MC), ``label`` is 1 for the right candidate and 0 otherwise (the single
logit of the K = 1 head), and two extra keys say where the row belongs: ``group``
(the item's index in the dataset, 0..G−1) and ``candidate`` (0..C−1). Rows of one
item are consecutive; :func:`stablesynth.evaluation.metrics.rows_to_candidates`
turns the per-row logits back into [G, C] for :func:`~stablesynth.evaluation.metrics.mc_accuracy`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from stablesynth.config import Config, require
from stablesynth.data.annotation_records import MCRecord, QARecord
from stablesynth.data.video import SAMPLING_MODES, preprocess, read_clip
from stablesynth.presets import TaskPreset

Encode = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]
FrameReader = Callable[..., np.ndarray]
CLIP_KEYS: tuple[str, ...] = ("frames", "input_ids", "attention_mask", "label", "device", "question_type",
                              "upload_index", "global_index", "sample_id")
MC_KEYS: tuple[str, ...] = (*CLIP_KEYS, "group", "candidate")


class VideoDatasetConfig(Config):
    """How clips become loader items (see the module docstring for the device grouping)."""

    num_frames: int = 3
    global_frames: int = 3
    image_size: int = 224
    text_len: int = 40
    sampling: Literal["uniform", "random"] = "uniform"
    device_by: Literal["auto", "category", "hash"] = "auto"
    n_devices: int = 20
    seed: int = 0

    def check(self) -> None:
        require(self.num_frames >= 1, "num_frames", f"must be >= 1, got {self.num_frames}")
        require(1 <= self.global_frames <= self.num_frames, "global_frames",
                f"must be in [1, num_frames={self.num_frames}], got {self.global_frames}")
        require(self.image_size >= 1, "image_size", f"must be >= 1, got {self.image_size}")
        require(self.text_len >= 2, "text_len", f"must be >= 2 ([CLS] and [SEP]), got {self.text_len}")
        require(self.sampling in SAMPLING_MODES, "sampling", f"must be one of {list(SAMPLING_MODES)}")
        require(self.device_by in ("auto", "category", "hash"), "device_by",
                "must be 'auto', 'category' or 'hash'")
        require(self.n_devices >= 1, "n_devices", f"must be >= 1, got {self.n_devices}")

    @classmethod
    def from_preset(cls, preset: TaskPreset, **overrides: object) -> VideoDatasetConfig:
        """Frames D, image size and text length of a paper preset (D frames decoded, all averaged)."""
        base = {"num_frames": preset.frames, "global_frames": preset.frames, "image_size": preset.image_size,
                "text_len": preset.text_len}
        base.update(overrides)
        return cls.from_dict(base)


def hash_bucket(video_id: str, n_buckets: int) -> int:
    """A stable bucket of ``video_id`` (Python's ``hash`` is salted per process, sha1 is not)."""
    return int.from_bytes(hashlib.sha1(video_id.encode("utf-8")).digest()[:8], "little") % n_buckets


def device_of(video_id: str, category: int | None, cfg: VideoDatasetConfig) -> int:
    if cfg.device_by == "hash" or (cfg.device_by == "auto" and category is None):
        return hash_bucket(video_id, cfg.n_devices)
    if category is None:
        raise ValueError(f"video {video_id!r} has no category; use device_by='hash' or 'auto', or provide "
                         "MSR_VTT.json with the videos' categories")
    return int(category)


def _frame_choice(seed: int, sample_id: int, num_frames: int, global_frames: int) -> tuple[int, list[int]]:
    rng = np.random.default_rng([seed, sample_id])
    upload = int(rng.integers(0, num_frames))
    if global_frames == num_frames:
        glob = list(range(num_frames))
    else:
        glob = sorted(int(i) for i in rng.choice(num_frames, size=global_frames, replace=False))
    return upload, glob


class _ClipSource:
    """Decodes a clip's frames, remembering the last clip (MC rows of one item share it)."""

    def __init__(self, cfg: VideoDatasetConfig, reader: FrameReader) -> None:
        self.cfg = cfg
        self.reader = reader
        self.epoch = 0
        self._last: tuple[tuple[Path, int], torch.Tensor] | None = None

    def frames(self, path: Path, key: int) -> torch.Tensor:
        cache_key = (path, key if self.cfg.sampling == "random" else 0)
        if self._last is not None and self._last[0] == cache_key:
            return self._last[1]
        rng = None
        if self.cfg.sampling == "random":
            # Seeded per (seed, epoch, clip): reproducible, yet different frames every epoch.
            rng = np.random.default_rng([self.cfg.seed, self.epoch, key])
        raw = self.reader(path, self.cfg.num_frames, self.cfg.sampling, rng)
        frames = preprocess(raw, self.cfg.image_size)
        self._last = (cache_key, frames)
        return frames


class VideoQADataset(Dataset):
    """Open-ended QA records (:class:`~stablesynth.data.annotation_records.QARecord`) as clip-loader items.

    ``encode`` is any ``(texts, max_length) -> (input_ids, attention_mask)`` callable,
    e.g. :meth:`stablesynth.data.tokenizer.QuestionTokenizer.encode`. ``reader`` decodes a
    media path (video file or frame folder) and defaults to :func:`~stablesynth.data.video.read_clip`.
    """

    def __init__(self, records: Sequence[QARecord], encode: Encode, cfg: VideoDatasetConfig | None = None,
                 reader: FrameReader = read_clip) -> None:
        self.cfg = cfg or VideoDatasetConfig()
        self.cfg.check()
        self.records = list(records)
        for r in self.records:
            if not isinstance(r, QARecord):
                raise TypeError(f"VideoQADataset takes QARecord items, got {type(r).__name__}")
        self.encode = encode
        self._source = _ClipSource(self.cfg, reader)
        self.devices = [device_of(r.video_id, r.category, self.cfg) for r in self.records]
        self._choice = [_frame_choice(self.cfg.seed, r.sample_id, self.cfg.num_frames, self.cfg.global_frames)
                        for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Redraw random-mode frames for a new epoch (uniform mode ignores it)."""
        self._source.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.encode([text], self.cfg.text_len)
        return ids[0].long(), mask[0].long()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = self.records[index]
        ids, mask = self._text(r.question)
        upload, glob = self._choice[index]
        return {
            "frames": self._source.frames(r.media_path, r.sample_id),
            "input_ids": ids,
            "attention_mask": mask,
            "label": torch.tensor(r.label, dtype=torch.long),
            "device": torch.tensor(self.devices[index], dtype=torch.long),
            "question_type": torch.tensor(r.question_type, dtype=torch.long),
            "upload_index": torch.tensor(upload, dtype=torch.long),
            "global_index": torch.tensor(glob, dtype=torch.long),
            "sample_id": torch.tensor(r.sample_id, dtype=torch.long),
        }


def mc_text(question: str, candidate: str) -> str:
    """The paper's multiple-choice input: question and candidate joined by [SEP]."""
    return f"{question} [SEP] {candidate}" if question else candidate


class VideoMCDataset(VideoQADataset):
    """Multiple-choice records as one row per (item, candidate); see the module docstring."""

    def __init__(self, records: Sequence[MCRecord], encode: Encode, cfg: VideoDatasetConfig | None = None,
                 reader: FrameReader = read_clip) -> None:
        self.cfg = cfg or VideoDatasetConfig()
        self.cfg.check()
        self.items = list(records)
        for r in self.items:
            if not isinstance(r, MCRecord):
                raise TypeError(f"VideoMCDataset takes MCRecord items, got {type(r).__name__}")
        self.encode = encode
        self._source = _ClipSource(self.cfg, reader)
        self.rows = [(g, c) for g, r in enumerate(self.items) for c in range(len(r.options))]
        self.item_devices = [device_of(r.video_id, r.category, self.cfg) for r in self.items]
        #: The device of every row (its item's), like VideoQADataset.devices.
        self.devices = [self.item_devices[g] for g, _ in self.rows]
        # The device uploads one frame of the clip, the same for all of an item's candidates.
        self._choice = [_frame_choice(self.cfg.seed, r.sample_id, self.cfg.num_frames, self.cfg.global_frames)
                        for r in self.items]

    @property
    def answers(self) -> torch.Tensor:
        """The right candidate of every item, [G] (for mc_accuracy)."""
        return torch.tensor([r.answer for r in self.items], dtype=torch.long)

    @property
    def row_group(self) -> torch.Tensor:
        """The item of every row, [N_rows] (for rows_to_candidates)."""
        return torch.tensor([g for g, _ in self.rows], dtype=torch.long)

    @property
    def row_candidate(self) -> torch.Tensor:
        """The candidate index of every row, [N_rows]."""
        return torch.tensor([c for _, c in self.rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g, c = self.rows[index]
        r = self.items[g]
        ids, mask = self._text(mc_text(r.question, r.options[c]))
        upload, glob = self._choice[g]
        return {
            "frames": self._source.frames(r.media_path, r.sample_id),
            "input_ids": ids,
            "attention_mask": mask,
            "label": torch.tensor(int(c == r.answer), dtype=torch.long),
            "device": torch.tensor(self.item_devices[g], dtype=torch.long),
            "question_type": torch.tensor(0, dtype=torch.long),
            "upload_index": torch.tensor(upload, dtype=torch.long),
            "global_index": torch.tensor(glob, dtype=torch.long),
            "sample_id": torch.tensor(index, dtype=torch.long),
            "group": torch.tensor(g, dtype=torch.long),
            "candidate": torch.tensor(c, dtype=torch.long),
        }


def collate_clips(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch; every item must have the same keys and shapes."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    keys = list(items[0])
    for i, item in enumerate(items):
        if list(item) != keys:
            raise ValueError(f"item {i} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    return {k: torch.stack([item[k] for item in items]) for k in keys}
