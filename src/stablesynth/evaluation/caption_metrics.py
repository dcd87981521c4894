"""Multiple choice and retrieval over a [clips × captions] score matrix where captions repeat across clips.

Several clips share a caption ("a red circle"), so a retrieved item is a hit when it has the
right caption: text → video R@K (VR@K) counts a caption as found when one of its K best-scoring
clips has that caption; video → text R@K (TR@K) counts a clip as named when its caption is
among the K best-scoring captions. Ties count against the query (a wrong item scoring as high
as the best right one ranks above it). Every figure comes with its chance level, computed
exactly for the clips and captions at hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _check(sim: torch.Tensor, clip_caption: torch.Tensor) -> None:
    if sim.dim() != 2 or clip_caption.shape != (sim.shape[0],):
        raise ValueError(f"sim must be [clips, captions] and clip_caption [clips]; got {tuple(sim.shape)} "
                         f"and {tuple(clip_caption.shape)}")
    if len(clip_caption) and (int(clip_caption.min()) < 0 or int(clip_caption.max()) >= sim.shape[1]):
        raise ValueError("clip_caption holds an index outside the captions")


def text_to_video_ranks(sim: torch.Tensor, clip_caption: torch.Tensor) -> dict[int, int]:
    """Per caption present among the clips: how many wrong clips score at least as high as its best right clip."""
    _check(sim, clip_caption)
    out = {}
    for c in torch.unique(clip_caption).tolist():
        right = clip_caption == c
        best = sim[right, c].max()
        out[int(c)] = int((sim[~right, c] >= best).sum())
    return out


def video_to_text_ranks(sim: torch.Tensor, clip_caption: torch.Tensor) -> torch.Tensor:
    """Per clip: how many other captions score at least as high as its own."""
    _check(sim, clip_caption)
    own = sim.gather(1, clip_caption.unsqueeze(1))
    return (sim >= own).sum(dim=1) - 1


def caption_recall(sim: torch.Tensor, clip_caption: torch.Tensor,
                   ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """VR@K and TR@K (fractions) with hits defined by caption (module docstring)."""
    vr = torch.tensor(list(text_to_video_ranks(sim, clip_caption).values()))
    tr = video_to_text_ranks(sim, clip_caption)
    out = {f"VR@{k}": float((vr < k).double().mean()) for k in ks}
    out.update({f"TR@{k}": float((tr < k).double().mean()) for k in ks})
    return out


def caption_recall_chance(clip_caption: torch.Tensor, n_captions: int,
                          ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """The expected VR@K / TR@K of random scores: for a caption held by m of n clips,
    P(one of K random clips has it) = 1 − C(n−m, K) / C(n, K); TR@K = K / n_captions."""
    n = len(clip_caption)
    counts = torch.bincount(clip_caption, minlength=n_captions)
    held = [int(m) for m in counts.tolist() if m]
    out = {f"VR@{k}": sum(1 - math.comb(n - m, k) / math.comb(n, k) if k <= n else 1.0 for m in held) / len(held)
           for k in ks}
    out.update({f"TR@{k}": min(k, n_captions) / n_captions for k in ks})
    return out


def mc_hits(sim: torch.Tensor, options: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """bool [clips]: the right candidate has the highest score of the clip's ``options`` (ties: the first)."""
    if options.shape[0] != sim.shape[0] or answers.shape != (sim.shape[0],):
        raise ValueError("options [clips, candidates] and answers [clips] must match sim's clips")
    return sim.gather(1, options).argmax(dim=1) == answers
