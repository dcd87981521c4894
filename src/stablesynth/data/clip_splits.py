"""Drawing the benchmark's clip splits: which questions each device records, and how.

Per device, :func:`draw_split` draws a skewed mix of easy-VQA questions from the source
split (the *history* split from easy-VQA's train split, the *real-time* split from its
test split), then per clip a jitter seed, the frame the device uploads and the
``global_frames`` frames it averages. The result is a :class:`ClipTable`; the pixels are
rendered later, from the per-clip seed (:mod:`stablesynth.data.benchmark`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stablesynth.data.benchmark_config import BenchmarkConfig
from stablesynth.data.devices import DeviceSpec
from stablesynth.data.easyvqa import QUESTION_TYPES, EasyVQA

#: The easy-VQA split each benchmark split draws from; ``probe`` clips (one question type, many per
#: device, captured like a real-time session) come from the real-time clips' scenes.
SOURCE_SPLIT = {"history": "train", "realtime": "test", "probe": "test"}


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


def draw_split(
    rng: np.random.Generator,
    cfg: BenchmarkConfig,
    data: EasyVQA,
    devices: Sequence[DeviceSpec],
    split: str,
    per_device: int,
    first_id: int,
    question_type: int | None = None,
) -> ClipTable:
    """The clips of ``split`` for every device, ``per_device`` each, with sample ids from ``first_id``.

    Questions follow each device's skew; with ``question_type`` they are all of that type instead,
    drawn uniformly (a probe of one kind of question)."""
    src = data.split(SOURCE_SPLIT[split])
    if question_type is None:
        by = src.answer if cfg.skew_over == "answer" else src.question_type
        by_np = by.numpy()
        n_cat = data.num_answers if cfg.skew_over == "answer" else len(QUESTION_TYPES)
        pools = [np.flatnonzero(by_np == c) for c in range(n_cat)]
        skews = [dev.skew for dev in devices]
    else:
        pools = [np.flatnonzero(src.question_type.numpy() == question_type)]
        skews = [[1.0] for _ in devices]
    questions, dev_ids = [], []
    for dev, skew in zip(devices, skews):
        w = np.asarray(skew, dtype=np.float64) * np.array([len(p) > 0 for p in pools], dtype=np.float64)
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
