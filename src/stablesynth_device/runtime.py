"""The device model on ONNX Runtime: encoder, head and question tokenizer, read from a bundle.

One session wrapper (:class:`OnnxModel`) with the execution providers chosen explicitly (the
CPU unless the caller names others) and the thread count set, so a device never picks up
whatever the platform happens to offer. :class:`DeviceRuntime` holds the three parts of the
device model:

- ``encode(frames, question) -> F_m [F, 192]``: every frame fused with the question (one frame at
  a time, as in training, so a frame's feature does not depend on its place in the clip);
- ``predict(f_g, weight, bias) -> logits [B, K]``: the static MLP and the dynamic layer, Θ_d as
  graph inputs, so a new Θ_d from the cloud is used without reloading anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stablesynth_device.bundle import (
    ENCODER,
    ENCODER_INPUTS,
    ENCODER_INT8,
    ENCODER_OUTPUT,
    HEAD,
    HEAD_INPUTS,
    HEAD_OUTPUT,
    TOKENIZER,
    Bundle,
    BundleError,
)
from stablesynth_device.frames import normalise

#: The providers a session uses unless told otherwise: the CPU, available on every device.
DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


class InputError(ValueError):
    """Input the device model cannot take: frames of the wrong size, an empty or over-long question."""


class OnnxModel:
    """One ONNX Runtime session: explicit providers and threads, inputs checked by name."""

    def __init__(self, path: str | Path, inputs: Sequence[str], output: str, threads: int = 1,
                 providers: Sequence[str] = DEFAULT_PROVIDERS) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        available = set(ort.get_available_providers())
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise BundleError(f"execution providers {unknown} are not available here (have {sorted(available)})")
        opts = ort.SessionOptions()
        # A device runs one clip at a time: a fixed pool avoids wake-up costs and shares the cores knowingly.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise BundleError(f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None
        names = tuple(i.name for i in self.session.get_inputs())
        if set(names) != set(inputs) or output not in {o.name for o in self.session.get_outputs()}:
            raise BundleError(f"{self.path}: inputs {list(names)} / outputs are not {list(inputs)} → {output!r}")
        self.inputs, self.output = tuple(inputs), output

    def run(self, **feeds: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


class QuestionTokenizer:
    """The bundle's ``tokenizers`` JSON: lower-cased BERT WordPiece, padded to the model's length."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise BundleError(f"{path}: not a tokenizers JSON ({exc})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = max_length
        self.unk_id = self._tok.token_to_id("[UNK]")
        self.pad_id = self._tok.token_to_id("[PAD]")
        if self.pad_id is None:
            raise BundleError(f"{path}: the tokenizer has no [PAD] token")

    def encode(self, question: str) -> tuple[np.ndarray, np.ndarray, int]:
        """``(input_ids, attention_mask)`` int64 [1, max_length] and how many tokens were unknown."""
        if not isinstance(question, str):
            raise InputError("the question must be text")
        if not question.strip():
            raise InputError("the question is empty")
        enc = self._tok.encode(question)
        n = len(enc.ids)
        if n > self.max_length:
            raise InputError(f"the question is {n} tokens long ([CLS] and [SEP] included); this model reads at "
                             f"most {self.max_length}")
        ids = np.full((1, self.max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((1, self.max_length), dtype=np.int64)
        ids[0, :n] = enc.ids
        mask[0, :n] = 1
        unknown = sum(1 for i in enc.ids if i == self.unk_id)
        return ids, mask, unknown


class DeviceRuntime:
    """Encoder, head and tokenizer of one bundle. ``int8`` picks the quantised encoder."""

    def __init__(self, bundle: Bundle, threads: int = 1, int8: bool = False,
                 providers: Sequence[str] = DEFAULT_PROVIDERS) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if int8 and not bundle.has(ENCODER_INT8):
            raise BundleError(f"{bundle.path}: no {ENCODER_INT8} (export the bundle with --int8)")
        self.bundle = bundle
        self.pre = bundle.preprocessing
        self.encoder = OnnxModel(bundle.file(ENCODER_INT8 if int8 else ENCODER), ENCODER_INPUTS, ENCODER_OUTPUT,
                                 threads, providers)
        self.head = OnnxModel(bundle.file(HEAD), HEAD_INPUTS, HEAD_OUTPUT, threads, providers)
        self.tokenizer = QuestionTokenizer(bundle.file(TOKENIZER), self.pre.max_question_len)

    def encode(self, frames: np.ndarray, question: str) -> np.ndarray:
        """Per-frame features F_m [F, 192] of one clip: ``frames`` [F, 3, S, S] in [0, 1] (see frames.py)."""
        x = normalise(frames, self.pre)
        ids, mask, _ = self.tokenizer.encode(question)
        return self.encode_tokens(x, ids, mask)[0]

    def encode_tokens(self, normalised: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """F_m [B, F, 192] of normalised frames [B, F, 3, S, S] (or one clip [F, 3, S, S]) and tokens [B, L]."""
        x = np.ascontiguousarray(normalised, dtype=np.float32)
        if x.ndim == 4:
            x = x[None]
        if x.shape[1] > self.pre.max_frames:
            raise InputError(f"{x.shape[1]} frames; this model takes at most {self.pre.max_frames} per clip")
        return self.encoder.run(frames=x, input_ids=np.asarray(input_ids, dtype=np.int64),
                                attention_mask=np.asarray(attention_mask, dtype=np.int64))

    def predict(self, f_g: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Logits [B, K] for clip features ``f_g`` [B, 192] (or [192]) under Θ_d = (weight, bias)."""
        x = np.ascontiguousarray(f_g, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        w, b = np.ascontiguousarray(weight, dtype=np.float32), np.ascontiguousarray(bias, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.bundle.feature_dim or w.ndim != 2 or w.shape[1] != self.bundle.hidden_dim \
                or b.shape != (w.shape[0],):
            raise InputError(f"shapes f_g {list(x.shape)}, weight {list(w.shape)}, bias {list(b.shape)} do not fit "
                             f"[B, {self.bundle.feature_dim}], [K, {self.bundle.hidden_dim}], [K]")
        return self.head.run(f_g=x, weight=w, bias=b)


def clip_feature(features: np.ndarray, global_index: Sequence[int]) -> np.ndarray:
    """F_g: the mean of the chosen frames' features (192 floats)."""
    return np.asarray(features, dtype=np.float32)[list(global_index)].mean(axis=0)
