"""Captions of easy-VQA scenes and the (clip, caption) rows of the multiple-choice and retrieval tasks.

Every easy-VQA scene shows one coloured shape, and its questions tell the colour and the
shape (:func:`~stablesynth.data.easyvqa.scene_attributes`), so each scene has a caption
"a <colour> <shape>": 8 colours × 3 shapes = 24 captions, numbered as :data:`CAPTIONS`.

:class:`CaptionPairs` turns the device benchmark's clips into rows of (clip, caption,
match) that the encoder reads as it reads (clip, question) rows:

- history (training): each clip with its own caption (match) and one distractor (no match):
  one sharing its colour, one sharing its shape or any other caption, with equal odds, drawn
  from the clip's sample id;
- real time (test): the first ``clips_per_device`` clips of each device's session, each with
  every one of the 24 captions, so one [clips × captions] score matrix gives retrieval in both
  directions and multiple choice (an item's five candidates are five of its columns).

A row keeps its clip's ``sample_id`` (so the benchmark's validation clips stay validation
rows); its ``label`` is 1 for the clip's own caption and 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stablesynth.data.benchmark import DeviceBenchmark, normalise_frames
from stablesynth.data.clip_splits import SOURCE_SPLIT
from stablesynth.data.easyvqa import COLORS, SHAPES, EasyVQA, scene_attributes

#: Captions as (colour, shape), numbered colour-major: caption c is (COLORS[c // 3], SHAPES[c % 3]).
CAPTIONS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
#: Candidates per multiple-choice item (MSRVTT-MC's five).
MC_CANDIDATES = 5
#: Bump when the rows drawn for a config change (checkpoints and caches keyed on it go stale).
ROWS_VERSION = 2


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def caption_texts() -> list[str]:
    """The 24 captions' sentences, in :data:`CAPTIONS` order."""
    return [caption(c, s) for c, s in CAPTIONS]


def caption_index(colour: str, shape: str) -> int:
    return CAPTIONS.index((colour, shape))


def image_captions(data: EasyVQA, split: str) -> torch.Tensor:
    """Per image of easy-VQA's ``split``, its caption index (-1 where its questions leave colour or shape open)."""
    colour, shape = scene_attributes(data, split)
    known = (colour >= 0) & (shape >= 0)
    return torch.where(known, colour.clamp(min=0) * len(SHAPES) + shape.clamp(min=0), torch.full_like(colour, -1))


def distractors(true: int, rng: np.random.Generator, same_colour: int, n: int) -> list[int]:
    """``n`` captions other than ``true``: ``same_colour`` of them share its colour (another shape), the rest its
    shape (another colour), so none is ruled out by a cue the clip does not show."""
    colour, shape = CAPTIONS[true]
    shapes = [s for s in SHAPES if s != shape]
    colours = [c for c in COLORS if c != colour]
    k = min(same_colour, len(shapes), n)
    if n - k > len(colours):
        raise ValueError(f"{n} distractors need more than the {len(colours)} other colours")
    out = [caption_index(colour, str(s)) for s in rng.permutation(shapes)[:k]]
    return out + [caption_index(str(c), shape) for c in rng.permutation(colours)[:n - k]]


def training_distractor(true: int, rng: np.random.Generator) -> int:
    """One negative caption for a training row: with equal odds one sharing the colour, one sharing the
    shape, or any other caption, so the model learns to reject each kind of mismatch (with only one
    kind, it ranks the others arbitrarily)."""
    colour, shape = CAPTIONS[true]
    kind = int(rng.integers(3))
    if kind == 0:
        pool = [caption_index(colour, s) for s in SHAPES if s != shape]
    elif kind == 1:
        pool = [caption_index(c, shape) for c in COLORS if c != colour]
    else:
        pool = [c for c in range(len(CAPTIONS)) if c != true]
    return pool[int(rng.integers(len(pool)))]


def mc_candidates(true: int, rng: np.random.Generator, same_colour: int = 2,
                  candidates: int = MC_CANDIDATES) -> tuple[list[int], int]:
    """A multiple-choice item: ``true`` among ``candidates - 1`` :func:`distractors`, shuffled; (captions, answer)."""
    options = [true, *distractors(true, rng, same_colour, candidates - 1)]
    order = rng.permutation(len(options)).tolist()
    options = [options[i] for i in order]
    return options, options.index(true)


class CaptionPairs:
    """(clip, caption) rows over a :class:`DeviceBenchmark`; see the module docstring."""

    def __init__(self, bench: DeviceBenchmark, clips_per_device: int, same_colour: int = 2, seed: int = 0,
                 template: str = "{caption}") -> None:
        if clips_per_device < 1:
            raise ValueError(f"clips_per_device must be >= 1, got {clips_per_device}")
        if "{caption}" not in template:
            raise ValueError(f"template must contain '{{caption}}', got {template!r}")
        self.bench = bench
        self.same_colour = same_colour
        self.seed = seed
        #: What the encoder reads for each caption (the caption itself, or a question around it).
        self.texts = [template.format(caption=c) for c in caption_texts()]
        ids, mask = self._tokenize(bench.cfg.max_question_len)
        self._ids, self._mask = ids, mask
        self.clip_caption = {s: image_captions(bench.data, SOURCE_SPLIT[s])[bench.splits[s].image]
                             for s in ("history", "realtime")}
        self.rows = {"history": self._history_rows(), "realtime": self._realtime_rows(clips_per_device)}

    def _tokenize(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        from stablesynth.data.tokenizer import load_tokenizer

        return load_tokenizer().encode(self.texts, length)

    def _rng(self, sample_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 7, int(sample_id)])

    def _history_rows(self) -> torch.Tensor:
        """[n, 3] (clip row, caption, label): every captioned clip with its caption and one distractor."""
        table = self.bench.splits["history"]
        rows = []
        for r in torch.nonzero(self.clip_caption["history"] >= 0).flatten().tolist():
            true = int(self.clip_caption["history"][r])
            wrong = training_distractor(true, self._rng(int(table.sample_id[r])))
            rows += [(r, true, 1), (r, wrong, 0)]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)

    def test_clips(self, clips_per_device: int) -> torch.Tensor:
        """Rows of the real-time table scored: each device's first ``clips_per_device`` captioned clips."""
        table = self.bench.splits["realtime"]
        captioned = self.clip_caption["realtime"] >= 0
        parts = [torch.nonzero((table.device == d.id) & captioned).flatten()[:clips_per_device]
                 for d in self.bench.devices]
        return torch.cat(parts)

    def _realtime_rows(self, clips_per_device: int) -> torch.Tensor:
        clips = self.test_clips(clips_per_device)
        n = len(self.texts)
        cap = torch.arange(n).repeat(len(clips))
        clip = clips.repeat_interleave(n)
        label = (self.clip_caption["realtime"][clip] == cap).long()
        return torch.stack([clip, cap, label], dim=1)

    @property
    def test_clip_rows(self) -> torch.Tensor:
        """The real-time table rows of the scored clips, in score-matrix order."""
        return self.rows["realtime"][::len(self.texts), 0]

    def mc_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per scored clip, its multiple-choice candidates [clips, 5] (caption indices) and the answer's position."""
        table = self.bench.splits["realtime"]
        options, answers = [], []
        for r in self.test_clip_rows.tolist():
            o, a = mc_candidates(int(self.clip_caption["realtime"][r]), self._rng(int(table.sample_id[r])),
                                 self.same_colour)
            options.append(o)
            answers.append(a)
        return torch.tensor(options, dtype=torch.long), torch.tensor(answers, dtype=torch.long)

    def select(self, split: str, devices: Sequence[int] | str | None = None) -> torch.Tensor:
        """Indices into ``rows[split]`` of the rows whose clips belong to ``devices`` (as DeviceBenchmark.rows)."""
        clips = self.bench.rows(split, devices)
        return torch.nonzero(torch.isin(self.rows[split][:, 0], clips)).flatten()

    def batch(self, split: str, index: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """A loader batch (the benchmark's keys) of rows ``index`` of ``split``: each clip rendered once."""
        rows = self.rows[split][torch.as_tensor(index, dtype=torch.long)]
        clips, inverse = torch.unique(rows[:, 0], return_inverse=True)
        table = self.bench.splits[split]
        c = rows[:, 0]
        frames = normalise_frames(self.bench.render(split, clips))[inverse]
        return {
            "frames": frames,
            "input_ids": self._ids[rows[:, 1]],
            "attention_mask": self._mask[rows[:, 1]],
            "label": rows[:, 2].clone(),
            "device": table.device[c],
            "question_type": torch.zeros(len(rows), dtype=torch.long),
            "upload_index": table.upload_index[c],
            "global_index": table.global_index[c],
            "sample_id": table.sample_id[c],
        }


class PairBatches(Sequence):
    """Batches of (clip, caption) rows, rendered when indexed (so a resumed cache decodes only what it lacks)."""

    def __init__(self, pairs: CaptionPairs, split: str, index: torch.Tensor, batch_size: int) -> None:
        self.pairs, self.split = pairs, split
        self.chunks = [index[s:s + batch_size] for s in range(0, len(index), batch_size)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.pairs.batch(self.split, self.chunks[i])
