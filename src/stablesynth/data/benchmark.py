"""The embedded device benchmark on easy-VQA (DESIGN.md §5): devices, splits, batches.

``DeviceBenchmark.build(cfg)`` draws devices (capture profile, session drift, usage skew)
and, per device, a *history* split of clips from easy-VQA's train split and a *real-time*
split from its test split. A device's real-time clips are one session in capture order
(row order): its camera drifts away from the history profile as the session goes on, so
the per-session mode's first clip is the session's first capture and later clips are
further from it. Unseen devices get a history too (the per-device fine-tuning
reference trains on it) but the cloud must never train on them.

A clip is one scene recorded as ``frames_per_clip`` frames with per-frame jitter. Which
frame the device uploads and which ``global_frames`` frames it averages are drawn when the
benchmark is built, so feature caching and evaluation agree. Pixels are rendered in the
loader's collate, a whole batch at once, from a per-clip seed: the same clip gives the same
frames every time it is read, whatever batch it lands in.

The config lives in :mod:`stablesynth.data.benchmark_config`, the split drawing in
:mod:`stablesynth.data.clip_splits`, the loaders in :mod:`stablesynth.data.clip_loader`
and the device picture in :mod:`stablesynth.data.device_grid`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stablesynth.data.benchmark_config import BENCH_SPLITS, BenchmarkConfig
from stablesynth.data.clip_splits import SOURCE_SPLIT, ClipTable, draw_split
from stablesynth.data.devices import CaptureProfile, DeviceSpec, capture_clips, sample_devices
from stablesynth.data.easyvqa import QUESTION_TYPES, EasyVQA, load_easyvqa, scene_attributes

CATEGORY_KINDS: tuple[str, ...] = ("answer", "question_type", "device")

# DeiT / ImageNet normalisation, which the encoder's visual tokens were trained with.
FRAME_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
FRAME_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BATCH_KEYS: tuple[str, ...] = (
    "frames",
    "input_ids",
    "attention_mask",
    "label",
    "device",
    "question_type",
    "upload_index",
    "global_index",
    "sample_id",
)

# Purposes of the independent random streams derived from the seed; adding clips to one
# split never changes the devices or the other split.
_STREAM_DEVICES, _STREAM_HISTORY, _STREAM_REALTIME, _STREAM_PROBE = 0, 1, 2, 3
#: The split :meth:`DeviceBenchmark.add_probe` draws (not part of the benchmark proper).
PROBE = "probe"

# Bump when rendering or sampling changes what a config produces, so cached features go stale.
#: 2: the real-time session's drift grows with the clip's position in the session.
RENDER_VERSION = 2


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] → DeiT/ImageNet-normalised."""
    mean = torch.tensor(FRAME_MEAN, dtype=frames.dtype).view(3, 1, 1)
    std = torch.tensor(FRAME_STD, dtype=frames.dtype).view(3, 1, 1)
    return (frames - mean) / std


class DeviceBenchmark:
    """Devices plus their history and real-time clips; builds loader batches."""

    def __init__(
        self, cfg: BenchmarkConfig, data: EasyVQA, devices: list[DeviceSpec], splits: dict[str, ClipTable]
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.devices = devices
        self.splits = splits
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._attributes: dict[str, dict[str, torch.Tensor]] = {}
        self._params = {s: torch.stack([dev.profile(s).to_tensor() for dev in devices]) for s in BENCH_SPLITS}

    @classmethod
    def build(cls, cfg: BenchmarkConfig | None = None, data: EasyVQA | None = None) -> DeviceBenchmark:
        cfg = cfg if cfg is not None else BenchmarkConfig()
        cfg.check()
        data = data if data is not None else load_easyvqa()
        n_cat = data.num_answers if cfg.skew_over == "answer" else len(QUESTION_TYPES)
        devices = sample_devices(
            np.random.default_rng([cfg.seed, _STREAM_DEVICES]),
            cfg.n_devices,
            cfg.n_unseen,
            n_cat,
            cfg.skew_over,
            cfg.skew_alpha,
            cfg.ranges(),
            cfg.drift,
        )
        history = draw_split(
            np.random.default_rng([cfg.seed, _STREAM_HISTORY]), cfg, data, devices, "history", cfg.history_per_device, 0
        )
        realtime = draw_split(
            np.random.default_rng([cfg.seed, _STREAM_REALTIME]),
            cfg,
            data,
            devices,
            "realtime",
            cfg.realtime_per_device,
            len(history),
        )
        return cls(cfg, data, devices, {"history": history, "realtime": realtime})

    # ----- metadata -------------------------------------------------------------------------

    @property
    def seen_devices(self) -> list[int]:
        return [d.id for d in self.devices if d.seen]

    @property
    def unseen_devices(self) -> list[int]:
        return [d.id for d in self.devices if not d.seen]

    @property
    def answer_names(self) -> list[str]:
        return list(self.data.answers)

    @property
    def num_classes(self) -> int:
        return self.data.num_answers

    @property
    def question_type_names(self) -> list[str]:
        return list(QUESTION_TYPES)

    def fingerprint(self) -> str:
        """A short hash of the config and the rendering version: feature caches key on it."""
        blob = json.dumps({"config": self.cfg.to_dict(), "render": RENDER_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _table(self, split: str) -> ClipTable:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(self.splits)})")
        return self.splits[split]

    def add_probe(self, question_type: str, per_device: int) -> None:
        """Draw the ``probe`` split: ``per_device`` questions of ``question_type`` for every device,
        from the real-time split's scenes, captured as a real-time session of that many clips.

        It measures one kind of question per device with narrower intervals than the few
        real-time clips of that kind allow. The other splits, the fingerprint and every cache
        keyed on it are unchanged (the probe has its own random stream).
        """
        if question_type not in QUESTION_TYPES:
            raise ValueError(f"unknown question type {question_type!r} (known: {', '.join(QUESTION_TYPES)})")
        if per_device < 1:
            raise ValueError(f"per_device must be >= 1, got {per_device}")
        first_id = sum(len(self.splits[s]) for s in BENCH_SPLITS)
        self.splits[PROBE] = draw_split(np.random.default_rng([self.cfg.seed, _STREAM_PROBE]), self.cfg, self.data,
                                        self.devices, PROBE, per_device, first_id,
                                        question_type=QUESTION_TYPES.index(question_type))

    def validation_rows(self) -> torch.Tensor:
        """History rows held out for choosing hyper-parameters: each seen device's last
        ``validation_per_device`` clips (capture order)."""
        n = self.cfg.validation_per_device
        table = self._table("history")
        parts = [torch.nonzero(table.device == d).flatten()[-n:] for d in self.seen_devices] if n else []
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def _resolve_devices(self, devices: Sequence[int] | str | None) -> list[int] | None:
        if devices is None or devices == "all":
            return None
        if devices == "seen":
            return self.seen_devices
        if devices == "unseen":
            return self.unseen_devices
        if isinstance(devices, str):
            raise ValueError(f"devices must be ids or one of 'all', 'seen', 'unseen', got {devices!r}")
        ids = [int(d) for d in devices]
        bad = [d for d in ids if not 0 <= d < len(self.devices)]
        if bad:
            raise ValueError(f"unknown device ids {bad} (benchmark has {len(self.devices)} devices)")
        return ids

    def rows(self, split: str, devices: Sequence[int] | str | None = None) -> torch.Tensor:
        """Row indices into ``split``'s table of the clips of ``devices`` (ids, 'seen', 'unseen', 'all';
        for history also 'train': the seen devices' clips less the validation rows)."""
        table = self._table(split)
        if devices == "train":
            seen = self.rows(split, "seen")
            return seen[~torch.isin(seen, self.validation_rows())] if split == "history" else seen
        ids = self._resolve_devices(devices)
        if ids is None:
            return torch.arange(len(table))
        return torch.isin(table.device, torch.tensor(ids, dtype=torch.long)).nonzero().squeeze(1)

    def samples(self, split: str, devices: Sequence[int] | str | None = None) -> ClipTable:
        """Metadata (labels, devices, question types, frame choices...) of the selected clips, in
        the order a non-shuffled loader yields them."""
        return self._table(split).index(self.rows(split, devices))

    def category(self, kind: str, split: str = "history", devices: Sequence[int] | str | None = None) -> torch.Tensor:
        """Per-clip category of ``kind`` ('answer', 'question_type', 'device'), aligned with :meth:`samples`."""
        t = self.samples(split, devices)
        if kind == "answer":
            return t.label
        if kind == "question_type":
            return t.question_type
        if kind == "device":
            return t.device
        raise ValueError(f"unknown category kind {kind!r} (known: {', '.join(CATEGORY_KINDS)})")

    def category_names(self, kind: str) -> list[str]:
        if kind == "answer":
            return self.answer_names
        if kind == "question_type":
            return self.question_type_names
        if kind == "device":
            return [f"device{d.id}" for d in self.devices]
        raise ValueError(f"unknown category kind {kind!r} (known: {', '.join(CATEGORY_KINDS)})")

    def num_categories(self, kind: str) -> int:
        return len(self.category_names(kind))

    def profile_params(self, split: str) -> torch.Tensor:
        """[n_devices, PROFILE_DIM] capture-profile rows of every device in ``split``'s session."""
        self._table(split)
        return self._params[split].clone()

    # ----- rendering ------------------------------------------------------------------------

    def tokens(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) ``[n, max_question_len]`` of every clip of ``split`` (tokenised once)."""
        if split not in self._tokens:
            from stablesynth.data.tokenizer import load_tokenizer

            table = self._table(split)
            src = self.data.split(SOURCE_SPLIT[split])
            uniq, inverse = torch.unique(table.question, return_inverse=True)
            ids, mask = load_tokenizer().encode([src.questions[int(q)] for q in uniq], self.cfg.max_question_len)
            self._tokens[split] = (ids[inverse], mask[inverse])
        return self._tokens[split]

    def scene_attributes(self, split: str) -> dict[str, torch.Tensor]:
        """``{"color", "shape"}``: per clip of ``split``, its scene's colour and shape (indices into
        COLORS / SHAPES, -100 where the scene's questions leave it open; worked out once per split)."""
        if split not in self._attributes:
            table = self._table(split)
            color, shape = scene_attributes(self.data, SOURCE_SPLIT[split])
            self._attributes[split] = {"color": color[table.image], "shape": shape[table.image]}
        return self._attributes[split]

    def session_fraction(self, split: str) -> torch.Tensor:
        """Per clip, (t + 1) / n: its position t in its device's session of n clips (capture order = row order)."""
        table = self._table(split)
        pos = torch.empty(len(table), dtype=torch.float32)
        for d in table.device.unique().tolist():
            idx = torch.nonzero(table.device == d).flatten()
            pos[idx] = (torch.arange(len(idx), dtype=torch.float32) + 1) / len(idx)
        return pos

    def render(
        self,
        split: str,
        rows: torch.Tensor,
        clean: bool = False,
        size: int | None = None,
        jitter: bool = True,
    ) -> torch.Tensor:
        """Frames ``[len(rows), N_f, 3, S, S]`` in [0, 1] of the given clips as their devices captured
        them (``clean``: through the identity profile, same jitter)."""
        table = self._table(split)
        rows = torch.as_tensor(rows, dtype=torch.long)
        images = self.data.split(SOURCE_SPLIT[split]).images[table.image[rows]]
        if clean:
            params = CaptureProfile.identity().to_tensor().expand(len(rows), -1).contiguous()
        else:
            session = split != "history"  # real-time clips, or a probe captured like them
            params = self._params["realtime" if session else "history"][table.device[rows]]
            if session:
                # A session drifts as it goes: clip t of n is captured with the history profile moved
                # (t + 1) / n of the way to the real-time one.
                hist = self._params["history"][table.device[rows]]
                params = hist + self.session_fraction(split)[rows].unsqueeze(1) * (params - hist)
        return capture_clips(
            images,
            params,
            table.jitter_seed[rows],
            self.cfg.frames_per_clip,
            size or self.cfg.image_size,
            self.cfg.jitter() if jitter else None,
        )

    def batch(self, split: str, rows: torch.Tensor | Sequence[int], clean: bool = False,
              attributes: bool = False) -> dict[str, torch.Tensor]:
        """One loader batch (keys :data:`BATCH_KEYS`, docs/architecture.md "Clip loader batches"); with
        ``attributes`` also each scene's ``color`` and ``shape`` (:meth:`scene_attributes`)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        table = self._table(split)
        if rows.dim() != 1:
            raise ValueError(f"rows must be 1-D, got shape {tuple(rows.shape)}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(table)):
            raise IndexError(f"row index out of range for split {split!r} with {len(table)} clips")
        ids, mask = self.tokens(split)
        extra = {k: v[rows] for k, v in self.scene_attributes(split).items()} if attributes else {}
        return {
            "frames": normalise_frames(self.render(split, rows, clean=clean)),
            "input_ids": ids[rows],
            "attention_mask": mask[rows],
            "label": table.label[rows],
            "device": table.device[rows],
            "question_type": table.question_type[rows],
            "upload_index": table.upload_index[rows],
            "global_index": table.global_index[rows],
            "sample_id": table.sample_id[rows],
            **extra,
        }

    def describe(self) -> list[dict[str, Any]]:
        """Per-device statistics (profiles, drift, skew, sample counts) as plain dicts."""
        out = []
        names = self.answer_names if self.cfg.skew_over == "answer" else self.question_type_names
        for dev in self.devices:
            counts = {}
            top_answers = {}
            for split in BENCH_SPLITS:
                t = self._table(split)
                sel = t.device == dev.id
                counts[split] = int(sel.sum())
                freq = torch.bincount(t.label[sel], minlength=self.num_classes).double()
                freq = freq / max(1.0, float(freq.sum()))
                top = torch.argsort(freq, descending=True)[:3]
                top_answers[split] = {self.answer_names[int(i)]: round(float(freq[i]), 3) for i in top}
            skew = np.asarray(dev.skew)
            top_skew = np.argsort(-skew)[:3]
            out.append(
                {
                    "device": dev.id,
                    "seen": dev.seen,
                    "history_profile": dev.history.to_dict(),
                    "realtime_profile": dev.realtime.to_dict(),
                    "drift": dev.drift(),
                    "skew_over": dev.skew_over,
                    "skew_top": {names[int(i)]: round(float(skew[i]), 3) for i in top_skew},
                    "top_answers": top_answers,
                    "history_clips": counts["history"],
                    "realtime_clips": counts["realtime"],
                }
            )
        return out

