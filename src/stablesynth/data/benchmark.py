"""The embedded device benchmark on easy-VQA (DESIGN.md §5): config, splits, clip loader.

``DeviceBenchmark.build(cfg)`` draws devices (capture profile, session drift, usage skew)
and, per device, a *history* split of clips from easy-VQA's train split and a *real-time*
split from its test split. Unseen devices get a history too (the per-device fine-tuning
reference trains on it) but the cloud must never train on them.

A clip is one scene recorded as ``frames_per_clip`` frames with per-frame jitter. Which
frame the device uploads and which ``global_frames`` frames it averages are drawn when the
benchmark is built, so feature caching and evaluation agree. Pixels are rendered in the
loader's collate, a whole batch at once, from a per-clip seed: the same clip gives the same
frames every time it is read, whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stablesynth.config import Config, FloatPair, require
from stablesynth.data.devices import (
    CaptureProfile,
    DeviceSpec,
    JitterConfig,
    ProfileRanges,
    capture_clips,
    sample_devices,
)
from stablesynth.data.easyvqa import QUESTION_TYPES, EasyVQA, load_easyvqa

BenchSplit = Literal["history", "realtime"]
BENCH_SPLITS: tuple[str, ...] = ("history", "realtime")
SOURCE_SPLIT = {"history": "train", "realtime": "test"}
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
_STREAM_DEVICES, _STREAM_HISTORY, _STREAM_REALTIME = 0, 1, 2

# Bump when rendering or sampling changes what a config produces, so cached features go stale.
RENDER_VERSION = 1


def default_config_path() -> Path:
    """The packaged default benchmark config (``stablesynth/configs/benchmark.yaml``)."""
    return Path(str(resources.files("stablesynth") / "configs" / "benchmark.yaml"))


def _range(cfg: Config, key: str, lo_min: float | None = None, lo_gt: float | None = None) -> None:
    value = getattr(cfg, key)
    require(len(value) == 2, key, f"expected [low, high], got {list(value)}")
    lo, hi = value
    require(np.isfinite(lo) and np.isfinite(hi), key, f"values must be finite, got {list(value)}")
    require(lo <= hi, key, f"low {lo} is above high {hi}")
    if lo_min is not None:
        require(lo >= lo_min, key, f"low must be >= {lo_min}, got {lo}")
    if lo_gt is not None:
        require(lo > lo_gt, key, f"low must be > {lo_gt}, got {lo}")


class BenchmarkConfig(Config):
    """Everything that defines the benchmark; the same config (and seed) gives the same benchmark.

    frames_per_clip is N_f; global_frames is D, the frames averaged into F_g. image_size is
    the side the frames are resized to (the encoder preset decides; easy-VQA scenes are 64 px).
    skew_over chooses what the per-device Dirichlet(skew_alpha) draw weights.
    """

    seed: int = 0
    n_devices: int = 30
    n_unseen: int = 6
    history_per_device: int = 120
    realtime_per_device: int = 60
    frames_per_clip: int = 5
    global_frames: int = 3
    image_size: int = 32
    max_question_len: int = 16
    skew_over: Literal["answer", "question_type"] = "answer"
    skew_alpha: float = 0.5
    gain_range: FloatPair = (0.55, 1.45)
    gamma_range: FloatPair = (0.7, 1.45)
    contrast_range: FloatPair = (0.7, 1.3)
    brightness_range: FloatPair = (-0.1, 0.1)
    noise_range: FloatPair = (0.0, 0.06)
    blur_range: FloatPair = (0.0, 1.2)
    drift: float = 0.05
    jitter_shift_px: float = 2.0
    jitter_noise_std: float = 0.01
    jitter_brightness_std: float = 0.02

    def check(self) -> None:
        require(self.n_devices >= 1, "n_devices", f"must be >= 1, got {self.n_devices}")
        require(self.n_unseen >= 0, "n_unseen", f"must be >= 0, got {self.n_unseen}")
        require(
            self.n_unseen < self.n_devices,
            "n_unseen",
            f"must be below n_devices ({self.n_devices}) so some device is seen, got {self.n_unseen}",
        )
        for key in ("history_per_device", "realtime_per_device", "frames_per_clip"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.global_frames >= 1, "global_frames", f"must be >= 1, got {self.global_frames}")
        require(
            self.global_frames <= self.frames_per_clip,
            "global_frames",
            f"D={self.global_frames} cannot exceed frames_per_clip N_f={self.frames_per_clip}",
        )
        require(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        require(
            self.max_question_len >= 2, "max_question_len", f"must be >= 2 ([CLS], [SEP]), got {self.max_question_len}"
        )
        require(self.skew_alpha > 0, "skew_alpha", f"Dirichlet concentration must be > 0, got {self.skew_alpha}")
        _range(self, "gain_range", lo_min=0.0)
        _range(self, "gamma_range", lo_gt=0.0)
        _range(self, "contrast_range", lo_min=0.0)
        _range(self, "brightness_range")
        _range(self, "noise_range", lo_min=0.0)
        _range(self, "blur_range", lo_min=0.0)
        for key in ("drift", "jitter_shift_px", "jitter_noise_std", "jitter_brightness_std"):
            v = getattr(self, key)
            require(bool(np.isfinite(v)) and v >= 0, key, f"must be a finite value >= 0, got {v}")

    @classmethod
    def default(cls) -> BenchmarkConfig:
        """The packaged default config (falls back to the dataclass defaults if it is missing)."""
        path = default_config_path()
        return cls.from_file(path) if path.is_file() else cls()

    def ranges(self) -> ProfileRanges:
        return ProfileRanges(
            gain=tuple(self.gain_range),
            gamma=tuple(self.gamma_range),
            contrast=tuple(self.contrast_range),
            brightness=tuple(self.brightness_range),
            noise_std=tuple(self.noise_range),
            blur_sigma=tuple(self.blur_range),
        )

    def jitter(self) -> JitterConfig:
        return JitterConfig(self.jitter_shift_px, self.jitter_noise_std, self.jitter_brightness_std)


@dataclass(frozen=True)
class ClipTable:
    """Clips of one split as aligned tensors (row i is clip i).

    sample_id [n] unique over the whole benchmark; device [n]; image [n] and question [n]
    index into easy-VQA's source split; label [n] answer index; question_type [n];
    jitter_seed [n] per-clip seed of all per-frame randomness; upload_index [n] in [0, N_f);
    global_index [n, D] sorted distinct frames in [0, N_f).
    """

    split: str
    sample_id: torch.Tensor
    device: torch.Tensor
    image: torch.Tensor
    question: torch.Tensor
    label: torch.Tensor
    question_type: torch.Tensor
    jitter_seed: torch.Tensor
    upload_index: torch.Tensor
    global_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    def index(self, rows: torch.Tensor) -> ClipTable:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ClipTable(**{k: (v if k == "split" else v[rows]) for k, v in values.items()})


def _draw_split(
    rng: np.random.Generator,
    cfg: BenchmarkConfig,
    data: EasyVQA,
    devices: Sequence[DeviceSpec],
    split: str,
    per_device: int,
    first_id: int,
) -> ClipTable:
    src = data.split(SOURCE_SPLIT[split])
    by = src.answer if cfg.skew_over == "answer" else src.question_type
    by_np = by.numpy()
    n_cat = data.num_answers if cfg.skew_over == "answer" else len(QUESTION_TYPES)
    pools = [np.flatnonzero(by_np == c) for c in range(n_cat)]
    questions, dev_ids = [], []
    for dev in devices:
        w = np.asarray(dev.skew, dtype=np.float64) * np.array([len(p) > 0 for p in pools], dtype=np.float64)
        w = w / w.sum()
        counts = rng.multinomial(per_device, w)
        chosen = []
        for c, k in enumerate(counts):
            if k == 0:
                continue
            # Without replacement while the pool lasts, so a device rarely repeats a question.
            chosen.append(rng.choice(pools[c], size=int(k), replace=bool(k > len(pools[c]))))
        q = np.concatenate(chosen)
        rng.shuffle(q)
        questions.append(q)
        dev_ids.append(np.full(per_device, dev.id))
    q_all = torch.from_numpy(np.concatenate(questions)).long()
    n = int(q_all.shape[0])
    nf, d = cfg.frames_per_clip, cfg.global_frames
    global_index = np.sort(np.argsort(rng.random((n, nf)), axis=1)[:, :d], axis=1)
    return ClipTable(
        split=split,
        sample_id=torch.arange(first_id, first_id + n, dtype=torch.long),
        device=torch.from_numpy(np.concatenate(dev_ids)).long(),
        image=src.image[q_all].clone(),
        question=q_all,
        label=src.answer[q_all].clone(),
        question_type=src.question_type[q_all].clone(),
        jitter_seed=torch.from_numpy(rng.integers(0, 2**62, size=n)).long(),
        upload_index=torch.from_numpy(rng.integers(0, nf, size=n)).long(),
        global_index=torch.from_numpy(global_index).long(),
    )


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
        history = _draw_split(
            np.random.default_rng([cfg.seed, _STREAM_HISTORY]), cfg, data, devices, "history", cfg.history_per_device, 0
        )
        realtime = _draw_split(
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
            raise ValueError(f"unknown split {split!r} (known: {', '.join(BENCH_SPLITS)})")
        return self.splits[split]

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
        """Row indices into ``split``'s table of the clips of ``devices`` (ids, 'seen', 'unseen', 'all')."""
        table = self._table(split)
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
            params = self._params[split][table.device[rows]]
        return capture_clips(
            images,
            params,
            table.jitter_seed[rows],
            self.cfg.frames_per_clip,
            size or self.cfg.image_size,
            self.cfg.jitter() if jitter else None,
        )

    def batch(self, split: str, rows: torch.Tensor | Sequence[int], clean: bool = False) -> dict[str, torch.Tensor]:
        """One loader batch (keys :data:`BATCH_KEYS`, docs/architecture.md "Clip loader batches")."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        table = self._table(split)
        if rows.dim() != 1:
            raise ValueError(f"rows must be 1-D, got shape {tuple(rows.shape)}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(table)):
            raise IndexError(f"row index out of range for split {split!r} with {len(table)} clips")
        ids, mask = self.tokens(split)
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


class ClipDataset(Dataset):
    """Clips of one split (optionally some devices); items are row indices, the collate renders.

    Rendering in the collate lets one batch go through the capture pipeline as one tensor op.
    """

    def __init__(
        self,
        benchmark: DeviceBenchmark,
        split: str,
        devices: Sequence[int] | str | None = None,
        clean: bool = False,
    ) -> None:
        self.benchmark = benchmark
        self.split = split
        self.clean = clean
        self.rows = benchmark.rows(split, devices)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return self.benchmark.batch(self.split, torch.tensor(rows, dtype=torch.long), clean=self.clean)


def make_loader(
    benchmark: DeviceBenchmark,
    split: str = "history",
    devices: Sequence[int] | str | None = None,
    batch_size: int = 64,
    shuffle: bool = False,
    clean: bool = False,
    num_workers: int = 0,
    seed: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of dict batches (:data:`BATCH_KEYS`).

    ``devices``: ids, or 'seen' / 'unseen' / 'all' (None). Shuffling draws from ``seed``
    (default: the benchmark seed), so two loaders made alike yield the same order.
    ``clean=True`` renders through the identity profile (the no-shift reference).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = ClipDataset(benchmark, split, devices, clean)
    if len(ds) == 0:
        raise ValueError(f"no clips in split {split!r} for devices {devices!r}")
    generator = None
    if shuffle:
        generator = torch.Generator().manual_seed(benchmark.cfg.seed if seed is None else seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=ds.collate,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
    )


def load_config(path: str | Path | None = None) -> BenchmarkConfig:
    """A benchmark config from ``path``, or the packaged default."""
    return BenchmarkConfig.default() if path is None else BenchmarkConfig.from_file(path)


def devices_grid_png(
    benchmark: DeviceBenchmark,
    path: str | Path,
    scenes: Sequence[int] | None = None,
    size: int = 64,
) -> Path:
    """Draw one scene (or a few) as every device's camera records it, in its history and its
    real-time session, with the clean scene first; write a PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = benchmark.data.train
    if scenes is None:
        scenes = _default_scenes(benchmark)
    scenes = [int(s) for s in scenes]
    for s in scenes:
        if not 0 <= s < train.images.shape[0]:
            raise ValueError(f"scene {s} is not an easy-VQA train image index")
    n_dev = len(benchmark.devices)
    images = train.images[scenes]
    seeds = torch.zeros(len(scenes), dtype=torch.long)
    clean = capture_clips(
        images, CaptureProfile.identity().to_tensor().expand(len(scenes), -1).contiguous(), seeds, 1, size, None
    )[:, 0]
    rows = []  # (label, [n_dev] images)
    for s_i, s in enumerate(scenes):
        for split in BENCH_SPLITS:
            params = benchmark.profile_params(split)
            imgs = images[s_i : s_i + 1].expand(n_dev, -1, -1, -1).contiguous()
            frames = capture_clips(imgs, params, torch.arange(n_dev, dtype=torch.long) + 7919 * s, 1, size, None)
            rows.append((f"{_scene_label(benchmark, s)}\n{split}", clean[s_i], frames[:, 0]))

    fig, axes = plt.subplots(len(rows), n_dev + 1, figsize=(1.25 * (n_dev + 1), 1.45 * len(rows) + 0.4), squeeze=False)
    for r, (label, ref, frames) in enumerate(rows):
        axes[r, 0].imshow(ref.permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(label, fontsize=7)
        if r == 0:
            axes[r, 0].set_title("clean", fontsize=8)
        for d in range(n_dev):
            ax = axes[r, d + 1]
            ax.imshow(frames[d].permute(1, 2, 0).numpy())
            if r == 0:
                dev = benchmark.devices[d]
                ax.set_title(f"dev {d}" + ("" if dev.seen else "\n(unseen)"), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"easy-VQA scenes as each device captures them (seed {benchmark.cfg.seed})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scene_label(benchmark: DeviceBenchmark, image: int) -> str:
    train = benchmark.data.train
    idx = (train.image == image).nonzero().squeeze(1).tolist()
    color = shape = "?"
    for q in idx:
        t = int(train.question_type[q])
        if t == 1:
            color = benchmark.data.answers[int(train.answer[q])]
        elif t == 0:
            shape = benchmark.data.answers[int(train.answer[q])]
    return f"{color} {shape}"


def _default_scenes(benchmark: DeviceBenchmark) -> list[int]:
    """Two train scenes whose shapes have different, cast-sensitive colours (first found)."""
    train = benchmark.data.train
    want = ("gray", "teal")
    out = []
    for colour in want:
        a = benchmark.data.answers.index(colour) if colour in benchmark.data.answers else -1
        hits = ((train.question_type == 1) & (train.answer == a)).nonzero().squeeze(1)
        if len(hits):
            out.append(int(train.image[hits[0]]))
    return out or [0]
