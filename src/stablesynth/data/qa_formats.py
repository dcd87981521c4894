"""Readers of the open-ended video QA datasets (as All-in-One reads them).

| dataset        | annotations                                             | media                          |
|----------------|---------------------------------------------------------|--------------------------------|
| MSRVTT-QA      | ``msrvtt_qa_{train,val,test}.jsonl``                    | ``videos/all/{video_id}.mp4``  |
| MSVD-QA        | ``msvd_{train,val,test}_qa_encode.json`` (JSON-lines)   | ``YouTubeClips/{clip}.avi``    |
| TGIF FrameQA   | ``frameqa_{train,test}.jsonl``, or the original         | ``gifs/{gif_name}.gif``        |
|                | ``{Train,Test}_frameqa_question.tsv`` (with header)     |                                |

Each reader labels the answers with an :class:`~stablesynth.data.annotation_records.AnswerVocab`:
the given one, the published answer file, or the train split's most frequent answers.
MSRVTT-QA records get the video's category (:func:`~stablesynth.data.msrvtt_formats.read_msrvtt_categories`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from stablesynth.data.annotation_files import (
    DatasetFormatError,
    check_split,
    find_annotation,
    iter_lines,
    read_jsonl,
    read_tsv,
    require_annotation,
    require_field,
    resolve_dirs,
)
from stablesynth.data.annotation_records import AnswerVocab, QAAnnotations, QARecord
from stablesynth.data.msrvtt_formats import read_msrvtt_categories

QA_DATASETS: tuple[str, ...] = ("msrvtt-qa", "msvd-qa", "tgif-frameqa")
# All-in-One's label sizes, used when no answer file is present (see stablesynth.presets).
_DEFAULT_K = {"msrvtt-qa": 1501, "msvd-qa": 1001, "tgif-frameqa": 1541}


def _answer_vocab(ann: Path, vocab: AnswerVocab | None, vocab_name: str,
                  read_vocab: Callable[[Path], AnswerVocab],
                  train_rows: Callable[[], Iterable[tuple[Path, int, Mapping[str, Any]]]],
                  num_classes: int, dataset: str) -> AnswerVocab:
    """``vocab`` if given, else the answer file ``vocab_name`` (read by ``read_vocab``), else the
    most frequent answers of ``train_rows()`` (read only when neither is there)."""
    vocab_file = find_annotation(ann, [vocab_name])
    file_vocab = read_vocab(vocab_file) if vocab_file and vocab is None else None
    voc = vocab if vocab is not None else file_vocab
    if voc is None:
        voc = AnswerVocab.most_frequent(
            (str(require_field(o, "answer", p, n)).strip() for p, n, o in train_rows()), num_classes)
    if len(voc) > num_classes:
        raise DatasetFormatError(
            f"{dataset}: the answer vocabulary ({voc.source}) has {len(voc)} answers, more than "
            f"num_classes = {num_classes}")
    return voc


def _jsonl_rows(ann: Path, name: str) -> list[tuple[Path, int, Mapping[str, Any]]]:
    """(file, line number, object) triples of the JSON-lines annotation file ``name``."""
    p = require_annotation(ann, [name])
    return [(p, n, o) for n, o in read_jsonl(p)]


def read_msrvtt_qa(root: str | Path, split: str, *, num_classes: int = _DEFAULT_K["msrvtt-qa"],
                   vocab: AnswerVocab | None = None, annotation_dir: str | Path | None = None,
                   media_root: str | Path | None = None) -> QAAnnotations:
    """MSRVTT-QA: ``msrvtt_qa_{split}.jsonl`` (question, answer, video_id) + ``msrvtt_train_ans2label.json``.

    ``vocab`` overrides the answer file (e.g. the train split's vocabulary for a test split).
    """
    check_split(split, ("train", "val", "test"), "msrvtt-qa")
    ann, media = resolve_dirs(root, annotation_dir, media_root)
    voc = _answer_vocab(ann, vocab, "msrvtt_train_ans2label.json", AnswerVocab.from_ans2label,
                        lambda: _jsonl_rows(ann, "msrvtt_qa_train.jsonl"), num_classes, "msrvtt-qa")
    cats = read_msrvtt_categories(ann)
    records = []
    for p, n, o in _jsonl_rows(ann, f"msrvtt_qa_{split}.jsonl"):
        vid = str(require_field(o, "video_id", p, n, (str, int)))
        answer = require_field(o, "answer", p, n).strip()
        records.append(QARecord(
            sample_id=len(records), video_id=vid, media_path=media / "videos" / "all" / f"{vid}.mp4",
            question=require_field(o, "question", p, n), answer=answer, label=voc.encode(answer),
            category=cats.get(vid),
        ))
    return QAAnnotations("msrvtt-qa", split, records, voc)


def read_msvd_mapping(path: Path) -> dict[int, str]:
    """``msvd_youtube_mapping.txt``: lines "clip vidN" → {N: clip}."""
    out: dict[int, str] = {}
    for lineno, line in iter_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise DatasetFormatError(f"{path}:{lineno}: expected 'CLIP vidN', got {line.strip()!r}")
        out[int(parts[1][3:])] = parts[0]
    return out


def read_msvd_qa(root: str | Path, split: str, *, num_classes: int = _DEFAULT_K["msvd-qa"],
                 vocab: AnswerVocab | None = None, annotation_dir: str | Path | None = None,
                 media_root: str | Path | None = None) -> QAAnnotations:
    """MSVD-QA: ``msvd_{split}_qa_encode.json`` (JSON-lines, int video_id) + mapping + answer set."""
    check_split(split, ("train", "val", "test"), "msvd-qa")
    ann, media = resolve_dirs(root, annotation_dir, media_root)
    voc = _answer_vocab(ann, vocab, "msvd_answer_set.txt", AnswerVocab.from_answer_set,
                        lambda: _jsonl_rows(ann, "msvd_train_qa_encode.json"), num_classes, "msvd-qa")
    mapping_path = require_annotation(ann, ["msvd_youtube_mapping.txt"])
    mapping = read_msvd_mapping(mapping_path)
    records = []
    for p, n, o in _jsonl_rows(ann, f"msvd_{split}_qa_encode.json"):
        vid = require_field(o, "video_id", p, n, int)
        if vid not in mapping:
            raise DatasetFormatError(f"{p}:{n}: video_id {vid} has no line 'CLIP vid{vid}' in {mapping_path}")
        answer = require_field(o, "answer", p, n).strip()
        records.append(QARecord(
            sample_id=len(records), video_id=f"vid{vid}",
            media_path=media / "YouTubeClips" / f"{mapping[vid]}.avi",
            question=require_field(o, "question", p, n), answer=answer, label=voc.encode(answer),
        ))
    return QAAnnotations("msvd-qa", split, records, voc)


def _tgif_rows(ann: Path, split: str) -> list[tuple[Path, int, Mapping[str, Any]]]:
    jsonl = find_annotation(ann, [f"frameqa_{split}.jsonl"])
    if jsonl is not None:
        return [(jsonl, n, o) for n, o in read_jsonl(jsonl)]
    tsv = require_annotation(ann, [f"frameqa_{split}.jsonl", f"{split.capitalize()}_frameqa_question.tsv"])
    return [(tsv, n, o) for n, o in read_tsv(tsv)]


def read_tgif_frameqa(root: str | Path, split: str, *, num_classes: int = _DEFAULT_K["tgif-frameqa"],
                      vocab: AnswerVocab | None = None, annotation_dir: str | Path | None = None,
                      media_root: str | Path | None = None) -> QAAnnotations:
    """TGIF FrameQA: ``frameqa_{split}.jsonl`` or the original ``{Train,Test}_frameqa_question.tsv``.

    TGIF-QA has no validation split (All-in-One validates on test). The question type
    (0 object, 1 number, 2 colour, 3 location) is kept as ``question_type`` when present.
    """
    check_split(split, ("train", "test"), "tgif-frameqa")
    ann, media = resolve_dirs(root, annotation_dir, media_root)
    voc = _answer_vocab(ann, vocab, "frameqa_trainval_ans2label.json", AnswerVocab.from_ans2label,
                        lambda: _tgif_rows(ann, "train"), num_classes, "tgif-frameqa")
    records = []
    for p, n, o in _tgif_rows(ann, split):
        gif = require_field(o, "gif_name", p, n).strip()
        answer = require_field(o, "answer", p, n).strip()
        qtype = o.get("type", 0)
        try:
            qtype = int(qtype) if str(qtype).strip() != "" else 0
        except ValueError:
            raise DatasetFormatError(f"{p}:{n}: field 'type' is {qtype!r}, expected an integer") from None
        records.append(QARecord(
            sample_id=len(records), video_id=gif, media_path=media / "gifs" / f"{gif}.gif",
            question=require_field(o, "question", p, n), answer=answer, label=voc.encode(answer),
            question_type=qtype,
        ))
    return QAAnnotations("tgif-frameqa", split, records, voc)


_QA_READERS = {"msrvtt-qa": read_msrvtt_qa, "msvd-qa": read_msvd_qa, "tgif-frameqa": read_tgif_frameqa}


def read_qa(dataset: str, root: str | Path, split: str, **kwargs: Any) -> QAAnnotations:
    """Dispatch on the preset name: ``msrvtt-qa``, ``msvd-qa`` or ``tgif-frameqa``."""
    if dataset not in _QA_READERS:
        raise ValueError(f"unknown QA dataset {dataset!r} (known: {', '.join(QA_DATASETS)})")
    return _QA_READERS[dataset](root, split, **kwargs)
