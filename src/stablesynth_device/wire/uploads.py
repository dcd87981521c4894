"""The upload (device → cloud): one 192-float frame feature, parsed strictly.

Two body formats: 768 little-endian float32 bytes (``application/octet-stream``) or JSON
``{"feature": [192 numbers]}``. Whatever the bytes, :func:`decode_upload` returns a feature
or raises :class:`UploadError` (never anything else), so every bad body is a 4xx.

Every value must be finite and of magnitude at most :data:`MAX_UPLOAD_ABS`. Real frame
features are of order 1–10; the bound leaves three orders of magnitude of headroom and keeps
every finite upload far from float32 overflow in template fusion and the generator (a
feature of 1e37 would overflow there and fail the whole batch it travels with).
"""

from __future__ import annotations

import json
from typing import Any, Final

import numpy as np

UPLOAD_DIM: Final = 192
UPLOAD_BYTES: Final = UPLOAD_DIM * 4
#: Largest |value| an upload may hold (documented in docs/serving.md).
MAX_UPLOAD_ABS: Final = 1.0e4
#: JSON numbers longer than this (digits) are refused before Python builds a huge int.
_MAX_NUMBER_CHARS: Final = 64


class UploadError(ValueError):
    """An upload body that is not one 192-float feature; ``code`` is the API error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _to_f32(feature: Any) -> np.ndarray:
    # Anything with __array__ (a numpy array, a CPU torch tensor, a list) converts without this
    # module knowing of torch: the wire imports numpy alone.
    return np.ascontiguousarray(np.asarray(feature), dtype=np.float32).reshape(-1)


def check_feature(x: np.ndarray) -> None:
    """Raise :class:`UploadError` unless ``x`` is 192 finite values within ±MAX_UPLOAD_ABS."""
    if x.size != UPLOAD_DIM:
        raise UploadError("bad_size", f"feature has {x.size} values, expected {UPLOAD_DIM}")
    if not np.isfinite(x).all():
        raise UploadError("non_finite", "feature holds NaN or Inf")
    if float(np.abs(x).max()) > MAX_UPLOAD_ABS:
        raise UploadError("out_of_range", f"feature values must lie within ±{MAX_UPLOAD_ABS:g}")


def encode_upload(feature: Any) -> bytes:
    """The device's upload: one 192-float feature as 768 little-endian float32 bytes."""
    x = _to_f32(feature)
    try:
        check_feature(x)
    except UploadError as exc:
        raise ValueError(f"upload {exc.detail}") from None
    return x.astype("<f4").tobytes()


def _number(text: str) -> float:
    if len(text) > _MAX_NUMBER_CHARS:
        raise UploadError("bad_json", f"number of {len(text)} characters")
    return float(text)


def _constant(name: str) -> Any:
    raise UploadError("non_finite", f"JSON constant {name} is not a number")


def _parse_json(body: bytes) -> np.ndarray:
    try:
        obj: Any = json.loads(body, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except UploadError:
        raise
    except RecursionError:
        raise UploadError("bad_json", "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise UploadError("bad_json", f"body is not JSON: {exc}") from None
    feat = obj.get("feature") if isinstance(obj, dict) else None
    if not isinstance(feat, list) or not all(isinstance(v, float) for v in feat):
        raise UploadError("bad_json", 'expected {"feature": [192 numbers]}')
    if len(feat) != UPLOAD_DIM:
        raise UploadError("bad_size", f"feature has {len(feat)} values, expected {UPLOAD_DIM}")
    with np.errstate(over="ignore"):  # beyond float32: Inf, refused by check_feature
        return np.asarray(feat, dtype=np.float32)


def decode_upload(body: bytes, content_type: str | None) -> np.ndarray:
    """Parse an upload body into a float32 array [192] (its own copy); raises only :class:`UploadError`."""
    media = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if media == "application/json":
        x = _parse_json(body)
    elif media == "application/octet-stream":
        if len(body) != UPLOAD_BYTES:
            raise UploadError("bad_size", f"body has {len(body)} bytes, expected {UPLOAD_BYTES} "
                                          f"({UPLOAD_DIM} little-endian float32)")
        x = np.frombuffer(body, "<f4").astype(np.float32)
    else:
        raise UploadError("unsupported_media_type",
                          f"Content-Type {media!r}; use application/octet-stream or application/json")
    check_feature(x)
    return x.copy()
