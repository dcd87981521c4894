"""Wire protocol: round trips within each encoding's stated error; every damaged frame is refused."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stablesynth.cloud import framing
from stablesynth_device.wire import protocol, uploads
from stablesynth_device.wire.protocol import (
    PREFIX_BYTES,
    BadHeader,
    BadMagic,
    ChecksumMismatch,
    ModelMismatch,
    ProtocolError,
    Truncated,
    UnsupportedVersion,
)
from stablesynth_device.wire.uploads import UploadError

FLOATS = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def params(draw: st.DrawFn) -> dict[str, np.ndarray]:
    k = draw(st.integers(1, 12))
    h = draw(st.integers(1, 8))
    return {"weight": draw(arrays(np.float32, (k, h), elements=FLOATS)),
            "bias": draw(arrays(np.float32, (k,), elements=FLOATS))}


@SETTINGS
@given(params(), st.sampled_from(protocol.ENCODINGS))
def test_round_trip_within_stated_error(tensors: dict[str, np.ndarray], encoding: str) -> None:
    frame = framing.encode(tensors, encoding, "m", "v1")
    out, header = protocol.decode(frame, "m", "v1")
    assert header.encoding == encoding and header.model_id == "m" and header.model_version == "v1"
    assert set(out) == set(tensors)
    for name, ref in tensors.items():
        assert isinstance(out[name], np.ndarray) and out[name].dtype == np.float32 and out[name].shape == ref.shape
        err = np.abs(out[name] - ref)
        assert bool((err <= protocol.max_error(encoding, ref)).all()), (encoding, name, float(err.max()))


def _frame() -> bytes:
    g = torch.Generator().manual_seed(0)
    return framing.encode({"weight": torch.randn(5, 4, generator=g), "bias": torch.randn(5, generator=g)},
                           "int8", "model-a", "3")


@SETTINGS
@given(st.data())
def test_any_truncation_is_truncated(data: st.DataObject) -> None:
    frame = _frame()
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(Truncated):
        protocol.decode(frame[:cut], "model-a", "3")


@SETTINGS
@given(st.data())
def test_any_single_byte_corruption_is_refused_specifically(data: st.DataObject) -> None:
    frame = bytearray(_frame())
    pos = data.draw(st.integers(0, len(frame) - 1))
    frame[pos] = (frame[pos] + data.draw(st.integers(1, 255))) % 256
    if pos < 4:
        expected: tuple[type[ProtocolError], ...] = (BadMagic,)
    elif pos < 6:
        expected = (UnsupportedVersion,)
    elif pos < 10:  # header length: ends inside the data, or the CRC no longer covers the same bytes
        expected = (Truncated, ChecksumMismatch, BadHeader)
    else:  # header CRC, header or payload
        expected = (ChecksumMismatch,)
    with pytest.raises(expected):
        protocol.decode(bytes(frame), "model-a", "3")


def test_appended_bytes_are_refused() -> None:
    with pytest.raises(BadHeader):
        protocol.decode(_frame() + b"\0", "model-a", "3")


@pytest.mark.parametrize(("mid", "ver"), [("model-b", "3"), ("model-a", "4"), ("", "3")])
def test_wrong_model_or_version(mid: str, ver: str) -> None:
    with pytest.raises(ModelMismatch):
        protocol.decode(_frame(), mid, ver)


def test_consistent_but_lying_header_is_bad_header() -> None:
    """A header with a valid CRC that describes the wrong sizes (a buggy encoder) is BadHeader."""
    frame = _frame()
    _, version, hlen, _ = struct.unpack_from("<4sHII", frame)
    header = json.loads(frame[PREFIX_BYTES:PREFIX_BYTES + hlen])
    header["tensors"][0]["shape"] = [6, 4]
    raw = json.dumps(header).encode()
    prefix = struct.pack("<4sHII", b"SSYN", version, len(raw), zlib.crc32(raw))
    forged = prefix + raw + frame[PREFIX_BYTES + hlen:]
    with pytest.raises(BadHeader):
        protocol.decode(forged)


def test_encode_refuses_nan_and_fp16_overflow() -> None:
    with pytest.raises(ValueError, match="NaN"):
        framing.encode({"w": torch.tensor([float("nan")])}, "fp32", "m", "1")
    with pytest.raises(ValueError, match="fp16"):
        framing.encode({"w": torch.tensor([1e6])}, "fp16", "m", "1")


def test_sizes_match_the_paper_fp32_reply() -> None:
    """fp32 Θ_d at K=1501 is 97·1501·4 B = 568.7 KB of payload plus a small header."""
    frame = framing.encode({"weight": torch.zeros(1501, 96), "bias": torch.zeros(1501)}, "fp32", "m", "1")
    assert 97 * 1501 * 4 < len(frame) < 97 * 1501 * 4 + 512
    int8 = framing.encode({"weight": torch.zeros(1501, 96), "bias": torch.zeros(1501)}, "int8", "m", "1")
    assert len(int8) < len(frame) / 3.5


def test_upload_formats() -> None:
    x = torch.randn(192)
    for got in (uploads.decode_upload(uploads.encode_upload(x), "application/octet-stream"),
                uploads.decode_upload(uploads.encode_upload(x.numpy()), "application/octet-stream"),
                uploads.decode_upload(json.dumps({"feature": x.tolist()}).encode(), "application/json; charset=utf-8")):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert torch.equal(torch.from_numpy(got), x)
    cases = [
        (b"\0" * 767, "application/octet-stream", "bad_size"),
        (np.full(192, np.nan, "<f4").tobytes(), "application/octet-stream", "non_finite"),
        (json.dumps({"feature": [1.0] * 191}).encode(), "application/json", "bad_size"),
        (b"{not json", "application/json", "bad_json"),
        (json.dumps({"feature": ["a"] * 192}).encode(), "application/json", "bad_json"),
        (json.dumps({"feature": [1e39] * 192}).encode(), "application/json", "non_finite"),
        (b"\0" * 768, "text/plain", "unsupported_media_type"),
    ]
    for body, ctype, code in cases:
        with pytest.raises(UploadError) as info:
            uploads.decode_upload(body, ctype)
        assert info.value.code == code, (ctype, code, info.value)


@pytest.mark.parametrize("encoding", protocol.ENCODINGS)
def test_encode_batch_equals_encode_per_sample(encoding: str) -> None:
    g = torch.Generator().manual_seed(0)
    batch = {"weight": torch.randn(5, 7, 3, generator=g), "bias": torch.randn(5, 7, generator=g)}
    frames = framing.encode_batch(batch, encoding, "m", "v1")
    assert len(frames) == 5
    for i, frame in enumerate(frames):
        assert isinstance(frame, memoryview)
        one = {k: v[i] for k, v in batch.items()}
        assert bytes(frame) == framing.encode(one, encoding, "m", "v1")
        assert bytes(framing.encode_view(one, encoding, "m", "v1")) == bytes(frame)
        decoded, header = protocol.decode(bytes(frame), "m", "v1")
        assert header.encoding == encoding and set(decoded) == {"weight", "bias"}


@pytest.mark.parametrize("encoding", ["fp32", "int8"])
def test_encode_batch_refuses_only_the_non_finite_sample(encoding: str) -> None:
    batch = {"weight": torch.ones(3, 4, 2), "bias": torch.zeros(3, 4)}
    batch["bias"][1, 2] = float("nan")
    frames = framing.encode_batch(batch, encoding, "m", "v1")
    assert isinstance(frames[1], ValueError) and "'bias'" in str(frames[1])
    for i in (0, 2):
        decoded, _ = protocol.decode(bytes(frames[i]), "m", "v1")
        assert torch.equal(torch.from_numpy(decoded["weight"]), torch.ones(4, 2))
    assert framing.encode_batch({"x": torch.zeros(0, 3)}, "fp32", "m", "v1") == []
    with pytest.raises(ValueError, match="leading batch"):
        framing.encode_batch({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, "fp32", "m", "v1")
