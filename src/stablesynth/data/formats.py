"""Readers of the published annotation formats of the paper's datasets (as All-in-One reads them).

| dataset        | annotations                                             | media                          |
|----------------|---------------------------------------------------------|--------------------------------|
| MSRVTT-QA      | ``msrvtt_qa_{train,val,test}.jsonl``                    | ``videos/all/{video_id}.mp4``  |
| MSVD-QA        | ``msvd_{train,val,test}_qa_encode.json`` (JSON-lines)   | ``YouTubeClips/{clip}.avi``    |
| TGIF FrameQA   | ``frameqa_{train,test}.jsonl``, or the original         | ``gifs/{gif_name}.gif``        |
|                | ``{Train,Test}_frameqa_question.tsv`` (with header)     |                                |
| MSRVTT-MC      | ``msrvtt_mc_test.jsonl``                                | ``videos/all/{clip_name}.mp4`` |
| MSRVTT ret.    | ``annotation/MSR_VTT.json`` +                           | ``videos/all/{video_id}.mp4``  |
|                | ``{train,val}_list_jsfusion.txt`` (9k / 1k-A)           |                                |

Annotation files are looked up in ``annotation_dir`` (default: the dataset root) and in
its usual sub-folders (``annotation``, ``annotations``, ``meta_data``, ``metadata``,
``qa``); media paths are resolved under ``media_root`` (default: the root) but not
opened, so users with pre-extracted features need no videos.

Answer vocabularies come from the published answer file when present (an
``ans2label`` JSON, or MSVD's ``msvd_answer_set.txt`` whose line order is the label
order); otherwise they are built from the train split's most frequent answers, as
many as the preset's K. Answers outside the vocabulary get label −100, which
:func:`stablesynth.evaluation.metrics.accuracy` leaves out of the denominator.

Device ("user") grouping: MSRVTT videos carry one of 20 categories in ``MSR_VTT.json``
/ ``*videodatainfo.json``; when such a file is found the records get it as
``category``, and :mod:`stablesynth.data.video_dataset` uses it as the device id.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_LABEL = -100
ANNOTATION_SUBDIRS: tuple[str, ...] = (".", "annotation", "annotations", "meta_data", "metadata", "qa")
QA_DATASETS: tuple[str, ...] = ("msrvtt-qa", "msvd-qa", "tgif-frameqa")
# All-in-One's label sizes, used when no answer file is present (see stablesynth.presets).
_DEFAULT_K = {"msrvtt-qa": 1501, "msvd-qa": 1001, "tgif-frameqa": 1541}


class DatasetFormatError(ValueError):
    """An annotation file is missing or malformed; the message names the file (and line)."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class QARecord:
    """One open-ended question about one video. ``label`` is −100 outside the vocabulary."""

    sample_id: int
    video_id: str
    media_path: Path
    question: str
    answer: str
    label: int
    question_type: int = 0
    category: int | None = None


@dataclass(frozen=True)
class MCRecord:
    """One multiple-choice item: a clip, its candidates and the index of the right one.

    MSRVTT-MC has no question text (the candidates are captions); ``question`` is then "".
    """

    sample_id: int
    video_id: str
    media_path: Path
    options: tuple[str, ...]
    answer: int
    question: str = ""
    category: int | None = None


@dataclass(frozen=True)
class RetrievalRecord:
    """One (video, caption) pair of MSRVTT retrieval."""

    sample_id: int
    video_id: str
    media_path: Path
    caption: str
    category: int | None = None


@dataclass
class AnswerVocab:
    """Answer string ↔ label index."""

    ans2label: dict[str, int]
    source: str = "built"
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        size = max(self.ans2label.values(), default=-1) + 1
        labels = [""] * size
        for ans, idx in self.ans2label.items():
            labels[idx] = ans
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, answer: object) -> bool:
        return answer in self.ans2label

    def encode(self, answer: str) -> int:
        """The answer's label, or −100 when the answer is outside the vocabulary."""
        return self.ans2label.get(answer, IGNORE_LABEL)

    def decode(self, label: int) -> str:
        if not 0 <= label < len(self.labels):
            raise IndexError(f"label {label} outside the vocabulary of {len(self.labels)} answers")
        return self.labels[label]

    @classmethod
    def from_ans2label(cls, path: Path) -> AnswerVocab:
        """An ``ans2label`` JSON file: ``{answer: index}`` with distinct non-negative indices."""
        data = _load_json(path)
        if not isinstance(data, dict):
            raise DatasetFormatError(f"{path}: expected a JSON object answer → index")
        seen: dict[int, str] = {}
        for ans, idx in data.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise DatasetFormatError(
                    f"{path}: answer {ans!r} has index {idx!r}, expected an integer >= 0")
            if idx in seen:
                raise DatasetFormatError(f"{path}: answers {seen[idx]!r} and {ans!r} share index {idx}")
            seen[idx] = ans
        if not seen:
            raise DatasetFormatError(f"{path}: no answers")
        return cls({str(a): int(i) for a, i in data.items()}, source=str(path))

    @classmethod
    def from_answer_set(cls, path: Path) -> AnswerVocab:
        """A text file with one answer per line; the line order is the label order."""
        ans2label: dict[str, int] = {}
        for lineno, line in _lines(path):
            ans = line.strip()
            if not ans:
                continue
            if ans in ans2label:
                raise DatasetFormatError(f"{path}:{lineno}: answer {ans!r} appears twice")
            ans2label[ans] = len(ans2label)
        if not ans2label:
            raise DatasetFormatError(f"{path}: no answers")
        return cls(ans2label, source=str(path))

    @classmethod
    def most_frequent(cls, answers: Iterable[str], size: int) -> AnswerVocab:
        """The ``size`` most frequent answers (ties broken alphabetically, so the result is stable)."""
        if size < 1:
            raise ValueError(f"vocabulary size must be >= 1, got {size}")
        counts = Counter(answers)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
        return cls({a: i for i, (a, _) in enumerate(ranked)}, source=f"top-{size} train answers")


@dataclass
class QAAnnotations:
    """One split of an open-ended QA dataset."""

    dataset: str
    split: str
    records: list[QARecord]
    vocab: AnswerVocab

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_out_of_vocab(self) -> int:
        return sum(r.label == IGNORE_LABEL for r in self.records)


# ---------------------------------------------------------------- low-level readers


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as fh:
            yield from enumerate(fh, start=1)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc})") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) pairs of a JSON-lines file; a whole-file JSON list is accepted too."""
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    lines = list(_lines(path))
    first = next((line.strip() for _, line in lines if line.strip()), "")
    if first.startswith("["):
        # Some mirrors ship the same records as one JSON array; line numbers then point at the array.
        data = _load_json(path)
        if not isinstance(data, list):
            raise DatasetFormatError(f"{path}: expected JSON-lines or a JSON list")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DatasetFormatError(f"{path}: item {i} is not a JSON object")
            rows.append((i + 1, obj))
        return rows
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def read_tsv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a tab-separated file whose first line is the header."""
    path = Path(path)
    lines = list(_lines(path))
    if not lines or not lines[0][1].strip():
        raise DatasetFormatError(f"{path}:1: missing header line")
    reader = csv.reader((line for _, line in lines), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [h.strip() for h in next(reader)]
    rows: list[tuple[int, dict[str, str]]] = []
    for (lineno, raw), cells in zip(lines[1:], reader):
        if not raw.strip():
            continue
        if len(cells) < len(header):
            raise DatasetFormatError(
                f"{path}:{lineno}: {len(cells)} columns, the header has {len(header)} ({', '.join(header)})")
        rows.append((lineno, dict(zip(header, cells))))
    return rows


def _field(obj: Mapping[str, Any], key: str, path: Path, lineno: int,
           kind: type | tuple[type, ...] = str) -> Any:
    if key not in obj:
        raise DatasetFormatError(f"{path}:{lineno}: missing field {key!r} (has: {', '.join(sorted(obj))})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetFormatError(f"{path}:{lineno}: field {key!r} has {type(value).__name__} {value!r}")
    return value


def find_annotation(directory: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` found in ``directory`` or its usual annotation sub-folders."""
    for sub in ANNOTATION_SUBDIRS:
        for name in names:
            p = directory / sub / name
            if p.is_file():
                return p
    return None


def require_annotation(directory: Path, names: Sequence[str]) -> Path:
    p = find_annotation(directory, names)
    if p is None:
        where = ", ".join(str(directory / s) for s in ANNOTATION_SUBDIRS)
        raise DatasetFormatError(f"{' or '.join(names)}: file not found (looked in {where})")
    return p


def read_msrvtt_categories(directory: Path) -> dict[str, int]:
    """MSRVTT video id → category (0–19) from ``MSR_VTT.json`` / ``*videodatainfo.json``; {} if absent."""
    out: dict[str, int] = {}
    for name in ("MSR_VTT.json", "videodatainfo.json", "train_val_videodatainfo.json",
                 "test_videodatainfo.json"):
        p = find_annotation(directory, [name])
        if p is None:
            continue
        data = _load_json(p)
        videos = data.get("videos") if isinstance(data, dict) else None
        for v in videos or []:
            if isinstance(v, dict) and "video_id" in v and isinstance(v.get("category"), int):
                out[str(v["video_id"])] = int(v["category"])
    return out


def _check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset}: unknown split {split!r} (available: {', '.join(allowed)})")


# ---------------------------------------------------------------- open-ended QA


def _vocab(known: AnswerVocab | None, file_vocab: AnswerVocab | None, train_answers: Iterable[str] | None,
           num_classes: int, dataset: str) -> AnswerVocab:
    vocab = known if known is not None else file_vocab
    if vocab is None:
        if train_answers is None:
            raise DatasetFormatError(f"{dataset}: no answer vocabulary file and no train split to build one")
        vocab = AnswerVocab.most_frequent(train_answers, num_classes)
    if len(vocab) > num_classes:
        raise DatasetFormatError(
            f"{dataset}: the answer vocabulary ({vocab.source}) has {len(vocab)} answers, more than "
            f"num_classes = {num_classes}")
    return vocab


def read_msrvtt_qa(root: str | Path, split: str, *, num_classes: int = _DEFAULT_K["msrvtt-qa"],
                   vocab: AnswerVocab | None = None, annotation_dir: str | Path | None = None,
                   media_root: str | Path | None = None) -> QAAnnotations:
    """MSRVTT-QA: ``msrvtt_qa_{split}.jsonl`` (question, answer, video_id) + ``msrvtt_train_ans2label.json``.

    ``vocab`` overrides the answer file (e.g. the train split's vocabulary for a test split).
    """
    _check_split(split, ("train", "val", "test"), "msrvtt-qa")
    root = Path(root)
    ann = Path(annotation_dir) if annotation_dir else root
    media = Path(media_root) if media_root else root

    def rows(s: str) -> list[tuple[Path, int, dict[str, Any]]]:
        p = require_annotation(ann, [f"msrvtt_qa_{s}.jsonl"])
        return [(p, n, o) for n, o in read_jsonl(p)]

    vocab_file = find_annotation(ann, ["msrvtt_train_ans2label.json"])
    file_vocab = AnswerVocab.from_ans2label(vocab_file) if vocab_file and vocab is None else None
    train = None if vocab is not None or file_vocab is not None else (
        str(_field(o, "answer", p, n)).strip() for p, n, o in rows("train"))
    voc = _vocab(vocab, file_vocab, train, num_classes, "msrvtt-qa")
    cats = read_msrvtt_categories(ann)
    records = []
    for p, n, o in rows(split):
        vid = str(_field(o, "video_id", p, n, (str, int)))
        answer = _field(o, "answer", p, n).strip()
        records.append(QARecord(
            sample_id=len(records), video_id=vid, media_path=media / "videos" / "all" / f"{vid}.mp4",
            question=_field(o, "question", p, n), answer=answer, label=voc.encode(answer),
            category=cats.get(vid),
        ))
    return QAAnnotations("msrvtt-qa", split, records, voc)


def read_msvd_mapping(path: Path) -> dict[int, str]:
    """``msvd_youtube_mapping.txt``: lines "clip vidN" → {N: clip}."""
    out: dict[int, str] = {}
    for lineno, line in _lines(path):
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
    _check_split(split, ("train", "val", "test"), "msvd-qa")
    root = Path(root)
    ann = Path(annotation_dir) if annotation_dir else root
    media = Path(media_root) if media_root else root

    def rows(s: str) -> list[tuple[Path, int, dict[str, Any]]]:
        p = require_annotation(ann, [f"msvd_{s}_qa_encode.json"])
        return [(p, n, o) for n, o in read_jsonl(p)]

    vocab_file = find_annotation(ann, ["msvd_answer_set.txt"])
    file_vocab = AnswerVocab.from_answer_set(vocab_file) if vocab_file and vocab is None else None
    train = None if vocab is not None or file_vocab is not None else (
        str(_field(o, "answer", p, n)).strip() for p, n, o in rows("train"))
    voc = _vocab(vocab, file_vocab, train, num_classes, "msvd-qa")
    mapping_path = require_annotation(ann, ["msvd_youtube_mapping.txt"])
    mapping = read_msvd_mapping(mapping_path)
    records = []
    for p, n, o in rows(split):
        vid = _field(o, "video_id", p, n, int)
        if vid not in mapping:
            raise DatasetFormatError(f"{p}:{n}: video_id {vid} has no line 'CLIP vid{vid}' in {mapping_path}")
        answer = _field(o, "answer", p, n).strip()
        records.append(QARecord(
            sample_id=len(records), video_id=f"vid{vid}",
            media_path=media / "YouTubeClips" / f"{mapping[vid]}.avi",
            question=_field(o, "question", p, n), answer=answer, label=voc.encode(answer),
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
    _check_split(split, ("train", "test"), "tgif-frameqa")
    root = Path(root)
    ann = Path(annotation_dir) if annotation_dir else root
    media = Path(media_root) if media_root else root
    vocab_file = find_annotation(ann, ["frameqa_trainval_ans2label.json"])
    file_vocab = AnswerVocab.from_ans2label(vocab_file) if vocab_file and vocab is None else None
    train = None if vocab is not None or file_vocab is not None else (
        str(_field(o, "answer", p, n)).strip() for p, n, o in _tgif_rows(ann, "train"))
    voc = _vocab(vocab, file_vocab, train, num_classes, "tgif-frameqa")
    records = []
    for p, n, o in _tgif_rows(ann, split):
        gif = _field(o, "gif_name", p, n).strip()
        answer = _field(o, "answer", p, n).strip()
        qtype = o.get("type", 0)
        try:
            qtype = int(qtype) if str(qtype).strip() != "" else 0
        except ValueError:
            raise DatasetFormatError(f"{p}:{n}: field 'type' is {qtype!r}, expected an integer") from None
        records.append(QARecord(
            sample_id=len(records), video_id=gif, media_path=media / "gifs" / f"{gif}.gif",
            question=_field(o, "question", p, n), answer=answer, label=voc.encode(answer),
            question_type=qtype,
        ))
    return QAAnnotations("tgif-frameqa", split, records, voc)


_QA_READERS = {"msrvtt-qa": read_msrvtt_qa, "msvd-qa": read_msvd_qa, "tgif-frameqa": read_tgif_frameqa}


def read_qa(dataset: str, root: str | Path, split: str, **kwargs: Any) -> QAAnnotations:
    """Dispatch on the preset name: ``msrvtt-qa``, ``msvd-qa`` or ``tgif-frameqa``."""
    if dataset not in _QA_READERS:
        raise ValueError(f"unknown QA dataset {dataset!r} (known: {', '.join(QA_DATASETS)})")
    return _QA_READERS[dataset](root, split, **kwargs)


# ---------------------------------------------------------------- multiple choice, retrieval


def read_msrvtt_mc(root: str | Path, *, num_candidates: int = 5, annotation_dir: str | Path | None = None,
                   media_root: str | Path | None = None) -> list[MCRecord]:
    """MSRVTT-MC test set: ``msrvtt_mc_test.jsonl`` (clip_name, options, answer index)."""
    root = Path(root)
    ann = Path(annotation_dir) if annotation_dir else root
    media = Path(media_root) if media_root else root
    path = require_annotation(ann, ["msrvtt_mc_test.jsonl"])
    cats = read_msrvtt_categories(ann)
    records = []
    for n, o in read_jsonl(path):
        clip = _field(o, "clip_name", path, n)
        options = _field(o, "options", path, n, list)
        if len(options) != num_candidates or not all(isinstance(x, str) for x in options):
            raise DatasetFormatError(
                f"{path}:{n}: 'options' must be {num_candidates} strings, got {options!r}")
        answer = _field(o, "answer", path, n, int)
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
    _check_split(split, ("train", "test"), "msrvtt-ret")
    captions = captions or ("all" if split == "train" else "first")
    if captions not in ("all", "first"):
        raise ValueError(f"captions must be 'all' or 'first', got {captions!r}")
    root = Path(root)
    ann = Path(annotation_dir) if annotation_dir else root
    media = Path(media_root) if media_root else root
    list_name = "train_list_jsfusion.txt" if split == "train" else "val_list_jsfusion.txt"
    list_path = require_annotation(ann, [list_name])
    video_ids = [line.strip() for _, line in _lines(list_path) if line.strip()]
    if not video_ids:
        raise DatasetFormatError(f"{list_path}: no video ids")
    json_path = require_annotation(ann, ["MSR_VTT.json"])
    data = _load_json(json_path)
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
