"""The device bundle: everything a device needs, verified before anything of it is used.

A bundle is a folder written by the full package (``stablesynth device export``)::

    manifest.json          format and version, model id/version, K, every file's SHA-256 and size,
                           exporter and opset, the measured parity figures
    encoder.onnx           frames [B, F, 3, S, S] + input_ids/attention_mask [B, L] → F_m [B, F, 192]
    encoder.int8.onnx      the same, dynamically quantised (only with ``export --int8``)
    head.onnx              static MLP baked in; Θ_d (weight [K, 96], bias [K]) as graph inputs
    tokenizer.json         the question tokenizer (``tokenizers``), its vocabulary pruned to the encoder's table
    preprocessing.json     image size, mean/std, frames per clip, how the D frames and the upload are chosen
    answers.json           the K answer names, in logit order
    global.safetensors     the global Θ_d: the fallback when the cloud cannot be reached or trusted
    generator.safetensors  the generator's weights, to rebuild Θ_d from ``factors``/``driver`` replies

:meth:`Bundle.load` checks the format version, that every file the manifest lists is there with
its size and SHA-256 (and that no file the device needs is unlisted), and that the small files
parse into what the device expects; each failure is one :class:`BundleError` naming the file
and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from stablesynth_device.tensors import TensorFileError, read_tensors

BUNDLE_FORMAT: Final = "stablesynth-device-bundle"
BUNDLE_VERSION: Final = 2
MANIFEST: Final = "manifest.json"
ENCODER: Final = "encoder.onnx"
ENCODER_INT8: Final = "encoder.int8.onnx"
HEAD: Final = "head.onnx"
TOKENIZER: Final = "tokenizer.json"
PREPROCESSING: Final = "preprocessing.json"
ANSWERS: Final = "answers.json"
GLOBAL: Final = "global.safetensors"
GENERATOR: Final = "generator.safetensors"
#: Files every bundle has (``encoder.int8.onnx`` is optional).
REQUIRED_FILES: Final = (ENCODER, HEAD, TOKENIZER, PREPROCESSING, ANSWERS, GLOBAL, GENERATOR)
#: Graph inputs and outputs of the two ONNX models.
ENCODER_INPUTS: Final = ("frames", "input_ids", "attention_mask")
ENCODER_OUTPUT: Final = "features"
HEAD_INPUTS: Final = ("f_g", "weight", "bias")
HEAD_OUTPUT: Final = "logits"
#: Frame choices a bundle's preprocessing may name.
GLOBAL_SAMPLING: Final = ("uniform",)
UPLOAD_CHOICE: Final = ("middle", "first")


class BundleError(ValueError):
    """A device bundle that is missing, corrupt, of an unknown format or inconsistent."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's record of one file: its SHA-256 and size in bytes."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass(frozen=True)
class Preprocessing:
    """How the device turns a clip into the encoder's inputs (``preprocessing.json``)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frames_per_clip: int
    global_frames: int
    global_sampling: str
    upload_frame: str
    max_question_len: int
    max_frames: int

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Preprocessing:
        if not isinstance(obj, dict):
            raise BundleError(f"{where}: expected a JSON object")
        fields = {f: obj.get(f) for f in cls.__dataclass_fields__}
        for name in ("image_size", "frames_per_clip", "global_frames", "max_question_len", "max_frames"):
            v = fields[name]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BundleError(f"{where}: field {name!r} must be a positive integer, got {v!r}")
        for name in ("mean", "std"):
            v = fields[name]
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise BundleError(f"{where}: field {name!r} must be 3 numbers, got {v!r}")
            if name == "std" and min(v) <= 0:
                raise BundleError(f"{where}: field 'std' must be positive, got {v!r}")
            fields[name] = tuple(float(x) for x in v)
        if fields["global_sampling"] not in GLOBAL_SAMPLING:
            raise BundleError(f"{where}: field 'global_sampling' must be one of {GLOBAL_SAMPLING}, "
                              f"got {fields['global_sampling']!r}")
        if fields["upload_frame"] not in UPLOAD_CHOICE:
            raise BundleError(f"{where}: field 'upload_frame' must be one of {UPLOAD_CHOICE}, "
                              f"got {fields['upload_frame']!r}")
        if fields["global_frames"] > fields["frames_per_clip"]:
            raise BundleError(f"{where}: global_frames {fields['global_frames']} exceeds frames_per_clip "
                              f"{fields['frames_per_clip']}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {f: (list(v) if isinstance(v, tuple) else v) for f, v in self.__dict__.items()}

    def frame_choice(self, n_frames: int) -> tuple[list[int], int]:
        """The D frames averaged into F_g and the frame uploaded, for a clip of ``n_frames``.

        D evenly spaced frames (all of them when the clip is shorter); the middle frame is
        uploaded (the encoder reads every frame the same way, wherever it sits in the clip).
        """
        if n_frames < 1:
            raise ValueError("a clip needs at least one frame")
        d = min(self.global_frames, n_frames)
        picks = sorted({round(i * (n_frames - 1) / max(d - 1, 1)) for i in range(d)}) if d > 1 else [n_frames // 2]
        upload = n_frames // 2 if self.upload_frame == "middle" else 0
        return picks, upload


@dataclass
class Bundle:
    """A verified device bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    preprocessing: Preprocessing
    answers: list[str]
    global_params: dict[str, np.ndarray]

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def hidden_dim(self) -> int:
        return int(self.manifest["hidden_dim"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def encodings(self) -> list[str]:
        return list(self.manifest.get("encodings") or [])

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def generator_weights(self) -> dict[str, np.ndarray]:
        try:
            return read_tensors(self.file(GENERATOR))[0]
        except TensorFileError as exc:
            raise BundleError(str(exc)) from None

    @property
    def generator_kind(self) -> str:
        return str((self.manifest.get("method_config") or {}).get("generator", ""))

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        manifest = _load_manifest(path)
        files = manifest["files"]
        for name, entry in files.items():
            file = path / name
            if Path(name).name != name:
                raise BundleError(f"{path}/{MANIFEST}: field 'files' names {name!r}, not a file of the bundle")
            if not file.is_file():
                raise BundleError(f"{file}: missing (listed in {MANIFEST})")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise BundleError(f"{file}: changed or corrupt (size or SHA-256 differs from {MANIFEST})")
        pre_path = path / PREPROCESSING
        preprocessing = Preprocessing.from_dict(_read_json(pre_path), str(pre_path))
        answers = _read_json(path / ANSWERS)
        if not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise BundleError(f"{path / ANSWERS}: expected a list of answer names")
        if len(answers) != manifest["num_classes"]:
            raise BundleError(f"{path / ANSWERS}: {len(answers)} answers, but {MANIFEST} field 'num_classes' "
                              f"is {manifest['num_classes']}")
        try:
            glob, _ = read_tensors(path / GLOBAL)
        except TensorFileError as exc:
            raise BundleError(str(exc)) from None
        why = params_problem(glob, manifest["num_classes"], manifest["hidden_dim"])
        if why:
            raise BundleError(f"{path / GLOBAL}: {why}")
        return cls(path, manifest, preprocessing, answers, glob)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not JSON ({exc})") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _load_manifest(path: Path) -> dict[str, Any]:
    where = path / MANIFEST
    if not where.is_file():
        raise BundleError(f"{path} is not a device bundle (no {MANIFEST})")
    manifest = _read_json(where)
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: expected a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: field 'format' is {manifest.get('format')!r}, not {BUNDLE_FORMAT!r}")
    if manifest.get("bundle_version") != BUNDLE_VERSION:
        raise BundleError(f"{where}: field 'bundle_version' is {manifest.get('bundle_version')!r}; this device "
                          f"runtime reads version {BUNDLE_VERSION} (export the bundle again with this release)")
    for key, kind in (("model_id", str), ("model_version", str), ("num_classes", int), ("hidden_dim", int),
                      ("feature_dim", int), ("files", dict)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise BundleError(f"{where}: field {key!r} must be a {kind.__name__}, got {manifest.get(key)!r}")
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise BundleError(f"{where}: field 'files.{name}' must be {{sha256, bytes}}, got {entry!r}")
    missing = [f for f in REQUIRED_FILES if f not in manifest["files"]]
    if missing:
        raise BundleError(f"{where}: field 'files' lacks {missing}")
    return manifest


def params_problem(params: dict[str, np.ndarray], num_classes: int, hidden: int) -> str | None:
    """Why ``params`` is not a usable Θ_d for K = ``num_classes``, or None."""
    w, b = params.get("weight"), params.get("bias")
    if w is None or b is None:
        return f"parameters lack weight/bias (have {sorted(params)})"
    if tuple(w.shape) != (num_classes, hidden) or tuple(b.shape) != (num_classes,):
        return (f"shapes {list(w.shape)}, {list(b.shape)} do not fit weight [{num_classes}, {hidden}], "
                f"bias [{num_classes}]")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        return "parameters hold NaN or Inf"
    return None
