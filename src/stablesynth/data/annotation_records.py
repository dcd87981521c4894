"""Records of the paper's video datasets and the answer vocabulary that labels open-ended answers.

Answer vocabularies come from the published answer file when present (an
``ans2label`` JSON, or MSVD's ``msvd_answer_set.txt`` whose line order is the label
order); otherwise they are built from the train split's most frequent answers, as
many as the preset's K. Answers outside the vocabulary get label −100, which
:func:`stablesynth.evaluation.metrics.accuracy` leaves out of the denominator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stablesynth.data.annotation_files import DatasetFormatError, iter_lines, load_json

IGNORE_LABEL = -100


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
        data = load_json(path)
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
        for lineno, line in iter_lines(path):
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
