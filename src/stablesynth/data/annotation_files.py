"""Finding and reading annotation files: JSON, JSON-lines and TSV, with errors that name the file and line.

Annotation files are looked up in ``annotation_dir`` (default: the dataset root) and in
its usual sub-folders (``annotation``, ``annotations``, ``meta_data``, ``metadata``,
``qa``); media paths are resolved under ``media_root`` (default: the root) but not
opened, so users with pre-extracted features need no videos. The dataset readers live in
:mod:`stablesynth.data.qa_formats` and :mod:`stablesynth.data.msrvtt_formats`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ANNOTATION_SUBDIRS: tuple[str, ...] = (".", "annotation", "annotations", "meta_data", "metadata", "qa")


class DatasetFormatError(ValueError):
    """An annotation file is missing or malformed; the message names the file (and line)."""



def resolve_dirs(root: str | Path, annotation_dir: str | Path | None,
                 media_root: str | Path | None) -> tuple[Path, Path]:
    """(annotation folder, media folder): the given ones, or the dataset ``root`` for either left out."""
    root = Path(root)
    return (Path(annotation_dir) if annotation_dir else root, Path(media_root) if media_root else root)


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs of a UTF-8 text file."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as fh:
            yield from enumerate(fh, start=1)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc})") from None


def load_json(path: Path) -> Any:
    """The parsed content of a JSON file."""
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
    lines = list(iter_lines(path))
    first = next((line.strip() for _, line in lines if line.strip()), "")
    if first.startswith("["):
        # Some mirrors ship the same records as one JSON array; line numbers then point at the array.
        data = load_json(path)
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
    lines = list(iter_lines(path))
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


def require_field(obj: Mapping[str, Any], key: str, path: Path, lineno: int,
                  kind: type | tuple[type, ...] = str) -> Any:
    """Field ``key`` of the object read at ``path``:``lineno``, which must be of type ``kind``."""
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
    """Like :func:`find_annotation`, but a missing file is a :class:`DatasetFormatError`."""
    p = find_annotation(directory, names)
    if p is None:
        where = ", ".join(str(directory / s) for s in ANNOTATION_SUBDIRS)
        raise DatasetFormatError(f"{' or '.join(names)}: file not found (looked in {where})")
    return p



def check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    """Raise ValueError unless ``split`` is one of the dataset's ``allowed`` splits."""
    if split not in allowed:
        raise ValueError(f"{dataset}: unknown split {split!r} (available: {', '.join(allowed)})")
