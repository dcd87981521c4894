"""easy-VQA from the installed ``easy-vqa`` package: images, questions, answers, question types.

easy-VQA (PyPI ``easy-vqa``) ships 5,000 64×64 PNG images of one coloured shape and
48,248 questions over 13 answers, split into train (4,000 images) and test (1,000
images). The images are decoded once per process and kept in memory as uint8
``[N, 3, 64, 64]`` tensors; decoding all of them takes about a second, so no disk
cache is needed.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from stablesynth.assets import easyvqa_dir

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

# Question types, derived from the question text. Yes/no questions are split by what they
# ask about, because a colour cast only changes the answer of the colour ones.
QUESTION_TYPES: tuple[str, ...] = ("shape", "color", "yes_no_shape", "yes_no_color")

COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
#: A scene attribute its questions leave open (cross-entropy's ``ignore_index``).
IGNORE = -100


def question_type_of(question: str) -> int:
    """Index into :data:`QUESTION_TYPES` of one easy-VQA question, from its words alone."""
    words = question.lower().replace("?", " ").split()
    if not words:
        raise ValueError("empty question")
    if words[0] == "what":
        # "what color is the shape?" / "what is the color of the circle?" ask for a colour;
        # "what is the blue shape?" and "what shape is ..." ask for a shape.
        return 1 if ("color" in words or "colour" in words) else 0
    return 3 if any(w in COLORS for w in words) else 2


@dataclass(frozen=True)
class EasyVQASplit:
    """One easy-VQA split.

    images:        uint8 [N_img, 3, 64, 64]
    questions:     question texts, one per question
    answer:        long [N_q] index into the answer vocabulary
    image:         long [N_q] index into ``images``
    question_type: long [N_q] index into :data:`QUESTION_TYPES`
    """

    name: str
    images: torch.Tensor
    questions: tuple[str, ...]
    answer: torch.Tensor
    image: torch.Tensor
    question_type: torch.Tensor

    def __len__(self) -> int:
        return len(self.questions)


@dataclass(frozen=True)
class EasyVQA:
    """Both splits plus the 13-answer vocabulary (line order of ``answers.txt``)."""

    answers: tuple[str, ...]
    train: EasyVQASplit
    test: EasyVQASplit

    def split(self, name: str) -> EasyVQASplit:
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        raise ValueError(f"unknown easy-VQA split {name!r} (known: train, test)")

    @property
    def num_answers(self) -> int:
        return len(self.answers)


def _read_images(folder: Path, count: int) -> torch.Tensor:
    out = np.empty((count, 64, 64, 3), dtype=np.uint8)
    for i in range(count):
        path = folder / f"{i}.png"
        if not path.is_file():
            raise FileNotFoundError(f"easy-VQA image missing: {path}")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape != (64, 64, 3):
            raise ValueError(f"{path}: expected a 64×64 RGB image, got {arr.shape}")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_split(root: Path, name: str, answer_index: dict[str, int]) -> EasyVQASplit:
    qpath = root / name / "questions.json"
    if not qpath.is_file():
        raise FileNotFoundError(f"easy-VQA questions missing: {qpath}")
    rows = json.loads(qpath.read_text())
    texts, answers, images = [], [], []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3):
            raise ValueError(f"{qpath}: row {i} is not [question, answer, image_id]: {row!r}")
        text, answer, image_id = row
        if answer not in answer_index:
            raise ValueError(f"{qpath}: row {i} answer {answer!r} is not in answers.txt")
        texts.append(str(text))
        answers.append(answer_index[answer])
        images.append(int(image_id))
    n_images = max(images) + 1
    return EasyVQASplit(
        name=name,
        images=_read_images(root / name / "images", n_images),
        questions=tuple(texts),
        answer=torch.tensor(answers, dtype=torch.long),
        image=torch.tensor(images, dtype=torch.long),
        question_type=torch.tensor([question_type_of(t) for t in texts], dtype=torch.long),
    )


@functools.lru_cache(maxsize=4)
def load_easyvqa(root: str | None = None) -> EasyVQA:
    """Load easy-VQA (default: the installed package's data folder); cached per process."""
    base = Path(root) if root is not None else easyvqa_dir()
    answers_path = base / "answers.txt"
    if not answers_path.is_file():
        raise FileNotFoundError(f"easy-VQA answers.txt missing under {base}")
    answers = tuple(line.strip() for line in answers_path.read_text().splitlines() if line.strip())
    index = {a: i for i, a in enumerate(answers)}
    return EasyVQA(
        answers=answers,
        train=_load_split(base, "train", index),
        test=_load_split(base, "test", index),
    )


def scene_attributes(data: EasyVQA, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scene (colour, shape) indices into COLORS / SHAPES, read off the scene's questions.

    "What color …" and "what shape …" answers name them, and so does a what-question's
    own words ("what is the blue shape?"); a yes/no answer names one ("is there a red
    shape?" yes, "is there not a circle?" no) or rules one out, and a
    scene whose other values are all ruled out has the last one. Unknown: -100.
    """
    src = data.split(split)
    n = int(src.images.shape[0])
    attrs = ((COLORS, torch.full((n,), IGNORE, dtype=torch.long)), (SHAPES, torch.full((n,), IGNORE, dtype=torch.long)))
    excluded: list[list[set[int]]] = [[set() for _ in range(n)] for _ in attrs]
    for q, text in enumerate(src.questions):
        answer = data.answers[int(src.answer[q])]
        img = int(src.image[q])
        words = text.lower().replace("?", " ").split()
        # "What is the blue shape?" presupposes a blue shape; a yes/no question names one or rules it out.
        present = words[0] == "what" or (answer == "yes") != ("not" in words or "no" in words)
        for k, (names, value) in enumerate(attrs):
            if answer in names:
                value[img] = names.index(answer)
            for w in words:
                if w in names:
                    if present:
                        value[img] = names.index(w)
                    else:
                        excluded[k][img].add(names.index(w))
    for k, (names, value) in enumerate(attrs):
        for img in range(n):
            left = set(range(len(names))) - excluded[k][img]
            if value[img] == IGNORE and len(left) == 1:
                value[img] = left.pop()
    return attrs[0][1], attrs[1][1]
