"""The reply path's shortcuts give the bytes and refusals of the plain computation: expansion into
the frame, groups of uploads, the fp32/fp16 checks, numpy and PyTorch quantisation, the fast CRC,
and frames handed to their requests group by group."""

from __future__ import annotations

import asyncio
import gc
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from stablesynth.cloud import batching, framing, kernels
from stablesynth.cloud.batching import Batcher, OutputError
from stablesynth.cloud.framing import FrameWriter
from stablesynth.cloud.model import Expansion
from stablesynth.cloud.server import CloudModel
from stablesynth.models.device import ParamSpec
from stablesynth.models.generators import create_generator
from stablesynth_device.wire import crc, protocol


class _Hist:
    def observe(self, _: float) -> None: ...


def _ups(n: int) -> list[torch.Tensor]:
    return [torch.randn(192, generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.mark.parametrize("library", [True, False])
@pytest.mark.parametrize("size", [0, 1, 100, 4095, 4096, 70_001, 600_000])
def test_crc32_equals_zlib_for_every_kind_of_buffer(size: int, library: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not library:  # as on a platform without isal's wheels
        monkeypatch.setattr(crc, "_FAST", None)
    data = np.random.default_rng(size).integers(0, 256, size + 3, dtype=np.uint8)
    raw = data.tobytes()
    for buf in (raw[3:], memoryview(data)[3:], memoryview(raw)[3:], bytearray(raw[3:]),
                memoryview(data[3:].view(np.uint8))):
        assert crc.crc32(buf) == zlib.crc32(buf)
        assert crc.crc32(buf, 0x1234) == zlib.crc32(buf, 0x1234)


@pytest.mark.parametrize("generator", ["film", "lowrank", "full"])
def test_expanding_into_given_tensors_gives_the_same_bits(generator: str) -> None:
    torch.manual_seed(0)
    gen = create_generator(generator, (ParamSpec("weight", (9, 6)), ParamSpec("bias", (9,))), 8)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with torch.inference_mode():
        factors = gen.factors(torch.randn(3, 8))
        plain = gen.expand(factors)
        out = {"weight": torch.full((3, 9, 6), float("nan")), "bias": torch.full((3, 9), float("nan"))}
        into = gen.expand(factors, out=out)
    for name in ("weight", "bias"):
        assert into[name] is out[name] and torch.equal(into[name], plain[name])
    forms = gen.scaled_bases(factors)
    for name, (base, row, col) in forms.items():  # what an encoder writes itself, it leaves out of ``out``
        assert torch.equal((base * row.unsqueeze(-1)) * col.unsqueeze(1), plain[name])
        rest = {"bias": torch.full((3, 9), float("nan"))}
        with torch.inference_mode():
            assert set(gen.expand(factors, out=rest)) == {"bias"}
        assert torch.equal(rest["bias"], plain["bias"])
    assert set(forms) == ({"weight"} if generator == "film" else set())


@pytest.mark.parametrize("encoding", protocol.PARAM_ENCODINGS)
def test_frames_written_in_place_equal_frames_of_the_tensors(encoding: str) -> None:
    g = torch.Generator().manual_seed(3)
    batch = {"weight": torch.randn(4, 7, 5, generator=g), "bias": torch.randn(4, 7, generator=g)}
    writer = FrameWriter(encoding, "m", "v")

    def fill(out: dict[str, torch.Tensor]) -> None:
        for name, t in out.items():
            t.copy_(batch[name])

    for _ in range(2):  # the second time into the same scratch buffer
        frames = writer.write_into({"weight": (7, 5), "bias": (7,)}, fill, 4)
        assert [bytes(f) for f in frames] == \
            [framing.encode({k: v[i] for k, v in batch.items()}, encoding, "m", "v") for i in range(4)]


@pytest.mark.parametrize("encoding", protocol.PARAM_ENCODINGS)
def test_a_bound_given_beforehand_changes_no_byte(encoding: str) -> None:
    g = torch.Generator().manual_seed(4)
    batch = {"weight": torch.randn(3, 7, 5, generator=g) * 100, "bias": torch.randn(3, 7, generator=g)}
    writer = FrameWriter(encoding, "m", "v")

    def fill(out: dict[str, torch.Tensor]) -> None:
        for name, t in out.items():
            t.copy_(batch[name])

    plain = [bytes(f) for f in writer.write_into({"weight": (7, 5), "bias": (7,)}, fill, 3)]
    for bounds in ([1e3] * 3, [1e5] * 3, [1e3, float("nan"), 1e3]):
        frames = writer.write_into({"weight": (7, 5), "bias": (7,)}, fill, 3, np.array(bounds))
        assert [bytes(f) for f in frames] == plain


def _scaled_case(seed: int, rows: int = 9, cols: int = 6, n: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((rows, cols)) * np.logspace(-3, 2, rows)[:, None]).astype(np.float32)
    row = (1 + rng.standard_normal((n, rows)) * 0.3).astype(np.float32)
    col = (1 + rng.standard_normal((n, cols)) * 0.3).astype(np.float32)
    return base, row, col


@pytest.mark.parametrize("encoding", protocol.PARAM_ENCODINGS)
@pytest.mark.parametrize("case", ["usual", "zero row", "beyond fp16", "nan"])
def test_the_one_pass_kernels_write_the_bytes_of_the_plain_computation(encoding: str, case: str) -> None:
    base, row, col = _scaled_case(7)
    if case == "zero row":  # an int8 scale of 0: the group is quantised the plain way
        row[2, 4] = 0.0
    elif case == "beyond fp16":
        base[1, 1] = 1e6
    elif case == "nan":
        col[3, 2] = np.nan
    weight = (torch.from_numpy(base) * torch.from_numpy(row).unsqueeze(-1)) * torch.from_numpy(col).unsqueeze(1)
    bias = torch.from_numpy(row).clone()
    shapes = {"weight": tuple(base.shape), "bias": (base.shape[0],)}
    writer = FrameWriter(encoding, "m", "v")
    plain = writer.write_into(shapes, lambda out: [t.copy_({"weight": weight, "bias": bias}[k])
                                                   for k, t in out.items()], 4)
    bounds = weight.abs().flatten(1).amax(1).double().numpy() * 1.01
    for given in (None, bounds):
        asked: list[str] = []
        fast = writer.write_into(shapes, lambda out, asked=asked: [asked.append(k) or t.copy_(bias)
                                                                   for k, t in out.items()],
                                 4, given, {"weight": (base, row, col)})
        assert asked == ["bias"]  # the weight was written by the kernel, not asked of fill
        assert [bytes(f) if isinstance(f, memoryview) else str(f) for f in fast] == \
            [bytes(f) if isinstance(f, memoryview) else str(f) for f in plain]
    assert sum(isinstance(f, ValueError) for f in plain) == \
        {"usual": 0, "zero row": 0, "beyond fp16": 4 * (encoding == "fp16"), "nan": 1}[case]


@pytest.mark.parametrize("encoding", protocol.PARAM_ENCODINGS)
def test_where_the_kernels_cannot_run_pytorch_writes_the_same_bytes(encoding: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, row, col = _scaled_case(8)
    shapes = {"weight": tuple(base.shape), "bias": (base.shape[0],)}
    bias = torch.from_numpy(row).clone()

    def frames() -> list[bytes]:
        return [bytes(f) for f in FrameWriter(encoding, "m", "v").write_into(  # type: ignore[arg-type]
            shapes, lambda out: [t.copy_(bias) for t in out.values()], 4, None, {"weight": (base, row, col)})]

    fast = frames()
    monkeypatch.setattr(framing, "_kernels", lambda: None)
    assert frames() == fast
    assert kernels.usable()


def test_a_bound_beyond_fp16s_range_keeps_its_check() -> None:
    batch = {"weight": torch.ones(2, 4, 2), "bias": torch.zeros(2, 4)}
    batch["weight"][1, 0, 0] = 7e4

    def fill(out: dict[str, torch.Tensor]) -> None:
        for name, t in out.items():
            t.copy_(batch[name])

    for bounds in (np.array([1.0, 7e4]), np.array([1.0, float("inf")]), None):
        frames = FrameWriter("fp16", "m", "v").write_into({"weight": (4, 2), "bias": (4,)}, fill, 2, bounds)
        assert isinstance(frames[0], memoryview) and isinstance(frames[1], ValueError)


def test_fp16_refuses_exactly_the_values_beyond_its_range() -> None:
    edge = 65504.0
    for value, refused in [(edge, None), (65505.0, "fp16 range"), (-65519.0, "fp16 range"), (-edge, None),
                           (1e6, "fp16 range"), (float("inf"), "NaN or Inf"), (float("nan"), "NaN or Inf")]:
        batch = {"weight": torch.ones(3, 4, 2), "bias": torch.zeros(3, 4)}
        batch["weight"][1, 3, 1] = value
        for frames in (framing.encode_batch(batch, "fp16", "m", "v"),
                       FrameWriter("fp16", "m", "v").write_into(
                           {"weight": (4, 2), "bias": (4,)}, lambda out, b=batch: [t.copy_(b[k]) for k, t in
                                                                                   out.items()], 3)):
            if refused is None:
                decoded, _ = protocol.decode(bytes(frames[1]), "m", "v")
                assert float(decoded["weight"][3, 1]) == value
            else:
                assert isinstance(frames[1], ValueError) and refused in str(frames[1]), (value, frames[1])
            assert all(isinstance(frames[i], memoryview) for i in (0, 2))


def test_finite_fp32_values_whose_sum_overflows_are_sent() -> None:
    big = {"weight": torch.full((6, 3), 3e38), "bias": torch.full((6,), -3e38)}
    decoded, _ = protocol.decode(framing.encode(big, "fp32", "m", "v"), "m", "v")
    assert torch.equal(torch.from_numpy(decoded["weight"]), big["weight"])
    assert torch.equal(torch.from_numpy(decoded["bias"]), big["bias"])


def test_numpy_and_pytorch_quantisation_write_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 30, 17, generator=g) * torch.logspace(-40, 3, 30)[None, :, None]
    weight[1, 4] = 0.0  # a zero row
    weight[2, 5] = torch.randn(17, generator=g) * 1e-44  # subnormal: its scale is divided by
    weight[3, 6, 2] = float("nan")  # its sample is refused, the others are not
    batch = {"weight": weight, "bias": torch.randn(4, 30, generator=g)}
    monkeypatch.setattr(framing, "NUMPY_ELEMENTS", 1 << 30)
    in_numpy = framing.encode_batch(batch, "int8", "m", "v")
    monkeypatch.setattr(framing, "NUMPY_ELEMENTS", 0)
    in_torch = framing.encode_batch(batch, "int8", "m", "v")
    assert isinstance(in_numpy[3], ValueError) and isinstance(in_torch[3], ValueError)
    assert [bytes(f) for f in in_numpy[:3]] == [bytes(f) for f in in_torch[:3]]  # type: ignore[arg-type]


def test_a_failing_expansion_fails_only_its_own_upload(cloud: CloudModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = cloud.compute_each

    def compute_each(uploads: torch.Tensor, encoding: str) -> Any:
        expand = real(uploads, encoding)

        def flaky(part: slice, out: Any = None) -> Any:
            if part.start <= 2 < part.stop:
                raise RuntimeError("overflow in the expansion")
            return expand(part, out)

        return Expansion(flaky, expand.bounds)

    monkeypatch.setattr(cloud, "compute_each", compute_each)
    frames = Batcher(cloud, 64, 0.0, None, _Hist())._frames(_ups(5), "fp32")  # type: ignore[arg-type]
    assert isinstance(frames[2], OutputError) and "overflow" in str(frames[2])
    assert all(isinstance(f, memoryview) for i, f in enumerate(frames) if i != 2)


def test_each_group_of_frames_is_emitted_when_written(cloud: CloudModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Three uploads per group: their int8 frames (the weight written by the kernel) and the bias's scratch.
    writer = FrameWriter("int8", cloud.model_id, cloud.version)
    frame = writer.frame_memory(cloud.output_shapes("int8"), {"weight"})
    assert frame == writer.frame_memory(cloud.output_shapes("int8")) - 4 * 13 * 96 > 13 * 96
    monkeypatch.setattr(batching, "GROUP_BYTES", 3 * frame)
    seen: list[tuple[int, int]] = []
    frames = Batcher(cloud, 64, 0.0, None, _Hist())._frames(  # type: ignore[arg-type]
        _ups(7), "int8", lambda start, group: seen.append((start, len(group))))
    assert len(frames) == 7 and sorted(seen) == [(0, 2), (2, 2), (4, 3)]


@pytest.mark.parametrize("encoding", protocol.ENCODINGS)
def test_frames_are_handed_over_group_by_group_to_their_requests(cloud: CloudModel, encoding: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Run off the event loop, as under load: each request gets its own frame, in several groups."""
    monkeypatch.setattr(batching, "GROUP_BYTES", 4 * 97 * 13 * 2)  # two uploads per group
    ups = _ups(9)
    expected = framing.encode_batch(cloud.compute_batch(torch.stack(ups), encoding), encoding,
                                     cloud.model_id, cloud.version)

    async def run() -> list[Any]:
        with ThreadPoolExecutor(1) as worker, ThreadPoolExecutor(2) as encoder:
            b = Batcher(cloud, 64, 0.0, worker, _Hist(), inline_ms=0.0, encoder=encoder)  # type: ignore[arg-type]
            b.start()
            return await asyncio.gather(*(b.submit(u, encoding) for u in ups))

    assert [bytes(f) for f in asyncio.run(run())] == [bytes(f) for f in expected]  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ["fp32", "int8", "factors"])
def test_the_reply_path_leaves_no_reference_cycles(cloud: CloudModel, encoding: str) -> None:
    """A cycle through a request's future would keep its reply's buffer until the collector runs
    (rarely, in a serving process): hundreds of MB of replies, and fresh memory for every new one."""
    with ThreadPoolExecutor(2) as pool:
        b = Batcher(cloud, 64, 0.0, None, _Hist(), encoder=pool)  # type: ignore[arg-type]
        b._frames(_ups(6), encoding, lambda start, frames: None)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            del_me = b._frames(_ups(6), encoding, lambda start, frames: None)
            del del_me
            gc.collect()
            # Only reply-sized buffers count: other tests' server threads may leave garbage of their own.
            leaked = [o for o in gc.garbage if isinstance(o, bytearray | memoryview | torch.Tensor)
                      and (o.nbytes if not isinstance(o, bytearray) else len(o)) >= 4096]
            assert not leaked
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
