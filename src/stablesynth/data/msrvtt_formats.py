"""Readers of MSRVTT's multiple-choice and retrieval annotations, and of its video categories.

| dataset        | annotations                                             | media                          |
|----------------|---------------------------------------------------------|--------------------------------|
| MSRVTT-MC      | ``msrvtt_mc_test.jsonl``                                | ``videos/all/{clip_name}.mp4`` |
| MSRVTT ret.    | ``annotation/MSR_VTT.json`` +                           | ``videos/all/{video_id}.mp4``  |
|                | ``{train,val}_list_jsfusion.txt`` (9k / 1k-A)           |                                |

Device ("user") grouping: MSRVTT videos carry one of 20 categories in ``MSR_VTT.json``
/ ``*videodatainfo.json``; when such a file is found the records get it as
``category``, and :mod:`stablesynth.data.video_dataset` uses it as the device id.
"""

from __future__ import annotations

from pathlib import Path

from stablesynth.data.annotation_files import (
    DatasetFormatError,
    check_split,
    find_annotation,
    iter_lines,
    load_json,
    read_jsonl,
    require_annotation,
    require_field,
    resolve_dirs,
)
from stablesynth.data.annotation_records import MCRecord, RetrievalRecord


def read_msrvtt_categories(directory: Path) -> dict[str, int]:
    """MSRVTT video id → category (0–19) from ``MSR_VTT.json`` / ``*videodatainfo.json``; {} if absent."""
    out: dict[str, int] = {}
    for name in ("MSR_VTT.json", "videodatainfo.json", "train_val_videodatainfo.json",
                 "test_videodatainfo.json"):
        p = find_annotation(directory, [name])
        if p is None:
            continue
        data = load_json(p)
        videos = data.get("videos") if isinstance(data, dict) else None
        for v in videos or []:
            if isinstance(v, dict) and "video_id" in v and isinstance(v.get("category"), int):
                out[str(v["video_id"])] = int(v["category"])
    return out



def read_msrvtt_mc(root: str | Path, *, num_candidates: int = 5, annotation_dir: str | Path | None = None,
                   media_root: str | Path | None = None) -> list[MCRecord]:
    """MSRVTT-MC test set: ``msrvtt_mc_test.jsonl`` (clip_name, options, answer index)."""
    ann, media = resolve_dirs(root, annotation_dir, media_root)
    path = require_annotation(ann, ["msrvtt_mc_test.jsonl"])
    cats = read_msrvtt_categories(ann)
    records = []
    for n, o in read_jsonl(path):
        clip = require_field(o, "clip_name", path, n)
        options = require_field(o, "options", path, n, list)
        if len(options) != num_candidates or not all(isinstance(x, str) for x in options):
            raise DatasetFormatError(
                f"{path}:{n}: 'options' must be {num_candidates} strings, got {options!r}")
        answer = require_field(o, "answer", path, n, int)
        if not 0 <= answer < num_candidates:
            raise DatasetFormatError(f"{path}:{n}: 'answer' {answer} outside [0, {num_candidates})")
        question = o.get("question", "")
        records.append(MCRecord(
            sample_id=len(records), video_id=clip, media_path=media / "videos" / "all" / f"{clip}.mp4",
            options=tuple(options), answer=answer, question=question if isinstance(question, str) else "",
            category=cats.get(clip),
        ))
    return records


def read_msrvtt_retrieval(root: str | Path, split: str, *, captions: str | None = None,
                          annotation_dir: str | Path | None = None,
                          media_root: str | Path | None = None) -> list[RetrievalRecord]:
    """MSRVTT retrieval: ``MSR_VTT.json`` captions over the 9k (train) / 1k-A (test) JSFusion lists.

    captions: ``"all"`` gives one record per (video, caption); ``"first"`` keeps the first
    caption of each video in file order, so that caption i belongs to video i and the
    similarity matrix's ground truth is its diagonal. Default: all for train, first for test.
    """
    check_split(split, ("train", "test"), "msrvtt-ret")
    captions = captions or ("all" if split == "train" else "first")
    if captions not in ("all", "first"):
        raise ValueError(f"captions must be 'all' or 'first', got {captions!r}")
    ann, media = resolve_dirs(root, annotation_dir, media_root)
    list_name = "train_list_jsfusion.txt" if split == "train" else "val_list_jsfusion.txt"
    list_path = require_annotation(ann, [list_name])
    video_ids = [line.strip() for _, line in iter_lines(list_path) if line.strip()]
    if not video_ids:
        raise DatasetFormatError(f"{list_path}: no video ids")
    json_path = require_annotation(ann, ["MSR_VTT.json"])
    data = load_json(json_path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DatasetFormatError(f"{json_path}: missing the 'annotations' list")
    by_video: dict[str, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), str) or not isinstance(
                a.get("caption"), str):
            raise DatasetFormatError(f"{json_path}: annotations[{i}] needs string 'image_id' and 'caption'")
        by_video.setdefault(a["image_id"], []).append(a["caption"].strip())
    cats = read_msrvtt_categories(ann)
    records: list[RetrievalRecord] = []
    for vid in video_ids:
        caps = by_video.get(vid)
        if not caps:
            raise DatasetFormatError(f"{list_path}: video {vid!r} has no caption in {json_path}")
        for cap in caps if captions == "all" else caps[:1]:
            records.append(RetrievalRecord(
                sample_id=len(records), video_id=vid, media_path=media / "videos" / "all" / f"{vid}.mp4",
                caption=cap, category=cats.get(vid)))
    return records
