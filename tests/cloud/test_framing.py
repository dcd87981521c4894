"""Reply frames: protocol version 2 (named payload checksum, aligned payload), the per-upload
reply path of the batcher, and the allocator setting of serving processes."""

from __future__ import annotations

import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from stablesynth.cloud import framing
from stablesynth.cloud.batching import Batcher, OutputError
from stablesynth.cloud.server import CloudModel, _keep_freed_memory
from stablesynth_device.wire import protocol
from stablesynth_device.wire.protocol import PREFIX_BYTES, BadHeader, ChecksumMismatch, UnsupportedVersion

PARAMS = {"weight": torch.randn(7, 5, generator=torch.Generator().manual_seed(1)), "bias": torch.zeros(7)}


def _split(frame: bytes) -> tuple[int, dict, bytes]:
    _, version, hlen, _ = struct.unpack_from("<4sHII", frame)
    return version, json.loads(frame[PREFIX_BYTES:PREFIX_BYTES + hlen]), frame[PREFIX_BYTES + hlen:]


def _forge(header: dict, payload: bytes, version: int = protocol.PROTOCOL_VERSION) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<4sHII", b"SSYN", version, len(raw), zlib.crc32(raw)) + raw + payload


@pytest.mark.parametrize("checksum", list(protocol.CHECKSUMS))
@pytest.mark.parametrize("encoding", protocol.PARAM_ENCODINGS)
def test_both_checksums_round_trip_and_the_payload_is_aligned(encoding: str, checksum: str) -> None:
    frame = framing.encode(PARAMS, encoding, "m", "v", checksum)
    version, header, payload = _split(frame)
    assert version == 2 and header["checksum"] == checksum
    assert header["payload_checksum"] == protocol.payload_checksum(checksum, payload)
    assert len(header["payload_checksum"]) == protocol.CHECKSUMS[checksum]
    assert (len(frame) - len(payload)) % protocol.PAYLOAD_ALIGN == 0
    decoded, h = protocol.decode(frame, "m", "v")
    assert h.checksum == checksum and decoded["weight"].shape == (7, 5)


def test_the_server_default_is_crc32() -> None:
    assert _split(framing.encode(PARAMS, "fp32", "m", "v"))[1]["checksum"] == "crc32" == protocol.DEFAULT_CHECKSUM


def test_a_flipped_payload_bit_fails_either_checksum() -> None:
    for checksum in protocol.CHECKSUMS:
        frame = bytearray(framing.encode(PARAMS, "fp32", "m", "v", checksum))
        frame[-3] ^= 0x10
        with pytest.raises(ChecksumMismatch, match=checksum):
            protocol.decode(bytes(frame))


def test_version_1_frames_are_refused() -> None:
    _, header, payload = _split(framing.encode(PARAMS, "fp32", "m", "v", "sha256"))
    old = {k: v for k, v in header.items() if k not in ("checksum", "payload_checksum")}
    old["payload_sha256"] = header["payload_checksum"]
    with pytest.raises(UnsupportedVersion):
        protocol.decode(_forge(old, payload, version=1))


@pytest.mark.parametrize("change", [
    {"checksum": "md5"}, {"checksum": None}, {"payload_checksum": "ABCDEF01"}, {"payload_checksum": "abc"},
    {"payload_checksum": 12345678}, {"extra": 1}, {"payload_sha256": "0" * 64},
])
def test_header_checksum_fields_are_strict(change: dict) -> None:
    _, header, payload = _split(framing.encode(PARAMS, "fp32", "m", "v"))
    with pytest.raises(BadHeader):
        protocol.decode(_forge({**header, **change}, payload))


def test_a_header_without_a_checksum_field_is_refused() -> None:
    _, header, payload = _split(framing.encode(PARAMS, "fp32", "m", "v"))
    del header["checksum"]
    with pytest.raises(BadHeader, match="missing"):
        protocol.decode(_forge(header, payload))


def test_unknown_checksum_is_refused_at_encode_time() -> None:
    with pytest.raises(ValueError, match="checksum"):
        framing.encode(PARAMS, "fp32", "m", "v", "md5")


class _Hist:
    def observe(self, _: float) -> None: ...


@pytest.mark.parametrize("encoding", protocol.ENCODINGS)
def test_per_upload_frames_equal_the_batched_computation(cloud: CloudModel, encoding: str) -> None:
    """The batcher expands Θ_d upload by upload; the frames are those of the batched call."""
    assert cloud.expands_each(encoding) == (encoding in protocol.PARAM_ENCODINGS)
    ups = [torch.randn(192, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    frames = Batcher(cloud, 64, 0.0, None, _Hist())._frames(ups, encoding)  # type: ignore[arg-type]
    expected = framing.encode_batch(cloud.compute_batch(torch.stack(ups), encoding), encoding,
                                     cloud.model_id, cloud.version)
    assert [bytes(f) for f in frames] == [bytes(f) for f in expected]  # type: ignore[arg-type]


def test_encode_threads_give_the_same_frames_in_order(cloud: CloudModel) -> None:
    ups = [torch.randn(192, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    ups[4] = ups[4] * 0 + 9999.0  # its Θ_d is beyond the fp16 range: its own error, in its place
    alone = Batcher(cloud, 64, 0.0, None, _Hist())._frames(ups, "fp16")  # type: ignore[arg-type]
    with ThreadPoolExecutor(3) as pool:
        pooled = Batcher(cloud, 64, 0.0, None, _Hist(), encoder=pool)._frames(ups, "fp16")  # type: ignore[arg-type]
    assert isinstance(pooled[4], OutputError) and "fp16 range" in str(pooled[4])
    assert [bytes(f) for i, f in enumerate(pooled) if i != 4] == \
        [bytes(f) for i, f in enumerate(alone) if i != 4]  # type: ignore[arg-type]


def test_batched_small_frames_share_nothing_but_their_layout() -> None:
    batch = {"row_scale": torch.randn(6, 11), "col_scale": torch.randn(6, 3)}
    frames = framing.encode_batch(batch, "factors", "m", "v")
    for i, frame in enumerate(frames):
        out, _ = protocol.decode(bytes(frame), "m", "v")  # type: ignore[arg-type]
        assert torch.equal(torch.from_numpy(out["row_scale"]), batch["row_scale"][i])


def test_serving_processes_keep_freed_memory() -> None:
    assert isinstance(_keep_freed_memory(), bool)
