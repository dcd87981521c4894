"""The torch-free device half: the bundle, its verification, the ONNX models against PyTorch, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stablesynth.methods.base import METHODS
from stablesynth.methods.config import MethodConfig
from stablesynth.models.encoder import create_model
from stablesynth.models.global_model import encode_frames
from stablesynth_device import frames as device_frames
from stablesynth_device.bundle import Bundle, BundleError
from stablesynth_device.cli import main
from stablesynth_device.client import AdaptClient
from stablesynth_device.generators import GeneratorDecoder
from stablesynth_device.runtime import DeviceRuntime
from stablesynth_device.tensors import read_tensors, tensor_bytes, write_tensors

K = 13


def _cloud(generator: str = "film", seed: int = 0) -> Any:
    from stablesynth.cloud.server import CloudModel

    torch.manual_seed(seed)
    method = METHODS.get("stablesynth")(MethodConfig(generator=generator), K).eval()
    with torch.no_grad():
        for p in method.generator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return CloudModel(method, "easyvqa", "7", K, "stablesynth", MethodConfig(generator=generator).to_dict())


@pytest.fixture(scope="module")
def cloud() -> Any:
    return _cloud()


@pytest.fixture(scope="module")
def bundle(cloud: Any, tmp_path_factory: pytest.TempPathFactory, export_test_bundle: Any) -> Path:
    return export_test_bundle(cloud, tmp_path_factory.mktemp("b") / "bundle", int8=True)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_lists_every_file_with_hash_and_size(bundle: Path) -> None:
    b = Bundle.load(bundle)
    files = b.manifest["files"]
    assert set(files) == {p.name for p in bundle.iterdir() if p.name != "manifest.json"}
    assert {"encoder.onnx", "encoder.int8.onnx", "head.onnx", "tokenizer.json", "preprocessing.json",
            "answers.json", "global.safetensors", "generator.safetensors"} <= set(files)
    assert all(e["bytes"] == (bundle / n).stat().st_size and len(e["sha256"]) == 64 for n, e in files.items())
    assert b.manifest["exporter"]["opset"] == 17 and b.manifest["encoder"]["vocab_rows"] < 40


def test_encoder_onnx_equals_pytorch_for_every_question_length(bundle: Path, export_test_bundle: Any) -> None:
    """The mask is a real input: padded and unpadded questions give PyTorch's features."""
    torch.manual_seed(0)  # the test bundle's encoder is drawn from this seed (conftest)
    from stablesynth.models.global_model import GlobalModel

    encoder = GlobalModel(create_model("allinone-test"), K).eval().encoder
    rt = DeviceRuntime(Bundle.load(bundle))
    clip = np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32)
    x = device_frames.normalise(clip, rt.pre)
    from stablesynth.data.tokenizer import load_tokenizer

    for q in ("is it red?", "what color is the shape?", "what shape is it?"):
        ids_dev, mask_dev, unknown = rt.tokenizer.encode(q)
        assert unknown == 0
        ids_bert, mask_bert = load_tokenizer().encode([q], 8)
        assert np.array_equal(mask_dev, mask_bert.numpy())  # the same tokens, renumbered
        with torch.inference_mode():
            ref = encode_frames(encoder, torch.from_numpy(x)[None], ids_bert, mask_bert).numpy()
        got = rt.encode_tokens(x, ids_dev, mask_dev)
        n = int(mask_dev.sum())
        unpadded = rt.encode_tokens(x, ids_dev[:, :n], mask_dev[:, :n])
        assert np.abs(got - ref).max() < 1e-4 and np.abs(unpadded - ref).max() < 1e-4
    if int(mask_dev.sum()) < 8:  # padding changes the answer only through the mask
        assert not np.allclose(rt.encode_tokens(x, ids_dev, np.ones_like(mask_dev)), ref, atol=1e-4)


def test_head_onnx_equals_pytorch(bundle: Path, cloud: Any) -> None:
    rt = DeviceRuntime(Bundle.load(bundle))
    g = torch.Generator().manual_seed(3)
    f_g, upload = torch.randn(4, 192, generator=g), torch.randn(4, 192, generator=g)
    with torch.inference_mode():
        theta = cloud.method.adapt(upload)
        ref = cloud.method.predict(f_g, theta).numpy()
    got = np.stack([rt.predict(f_g[i].numpy(), theta["weight"][i].numpy(), theta["bias"][i].numpy())[0]
                    for i in range(4)])
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("generator", ["film", "lowrank", "full"])
def test_numpy_generator_rebuilds_the_clouds_theta(generator: str) -> None:
    cloud = _cloud(generator, seed=4)
    gen = cloud.method.generator
    weights = {k: v.detach().numpy() for k, v in gen.state_dict().items()}
    dec = GeneratorDecoder(generator, weights, K, 96)
    d = torch.randn(1, dec.driver_dim, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        factors = {k: v[0].numpy() for k, v in gen.factors(d).items()}
        want = {k: v[0].numpy() for k, v in gen(d).items()}
    from_factors, from_driver = dec.theta(factors), dec.theta_from_driver(d[0].numpy())
    for name in ("weight", "bias"):
        if generator in ("film", "full"):  # elementwise (or no) expansion in the cloud's order: the same bits
            assert np.array_equal(from_factors[name], want[name])
        assert np.abs(from_factors[name] - want[name]).max() < 1e-6
        assert np.abs(from_driver[name] - want[name]).max() < 1e-5
    with pytest.raises(ValueError, match="shape"):
        dec.theta({**factors, next(iter(factors)): np.zeros(7, np.float32)})


def test_safetensors_reader_reads_what_the_reference_writes(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16)}
    save_file(arrays, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    got, meta = read_tensors(tmp_path / "ref.safetensors")
    assert meta == {"k": "v"} and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    write_tensors(tmp_path / "ours.safetensors", arrays, {"k": "v"})
    ref = load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(ref[k], arrays[k]) for k in arrays)
    assert tensor_bytes(arrays, {"k": "v"})[:8] == (tmp_path / "ours.safetensors").read_bytes()[:8]


# ----------------------------------------------------------------------------- bad bundles


def _edit_manifest(d: Path, **fields: Any) -> Path:
    m = json.loads((d / "manifest.json").read_text())
    m.update(fields)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize(("change", "expect"), [
    (lambda d: (d / "head.onnx").write_bytes((d / "head.onnx").read_bytes()[:-1] + b"x"), "head.onnx: changed"),
    (lambda d: (d / "encoder.onnx").unlink(), "encoder.onnx: missing"),
    (lambda d: _edit_manifest(d, bundle_version=99), "bundle_version"),
    (lambda d: _edit_manifest(d, format="other"), "'format'"),
    (lambda d: (d / "manifest.json").write_text("{"), "not JSON"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: _edit_manifest(d, num_classes=12), "answers.json"),
])
def test_a_bad_bundle_is_one_clear_error(bundle: Path, tmp_path: Path, change: Any, expect: str) -> None:
    d = _copy(bundle, tmp_path)
    change(d)
    with pytest.raises(BundleError) as err:
        Bundle.load(d)
    assert expect in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- bad input through the CLI


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_offline_prediction_uses_the_global_parameters(bundle: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    clip = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "c.npy", clip)
    cache = _copy(bundle, tmp_path)  # its own cache folder
    rc, out, err = _run(["predict", "--bundle", str(cache), "--npy", str(tmp_path / "c.npy"),
                         "--question", "what shape is it?", "--offline", "--json", "--int8"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["source"] == "global" and res["error"].startswith("offline") and res["encoder"] == "int8"
    assert res["answer"] in Bundle.load(bundle).answers and set(res["timings_ms"]) >= {"encode", "head", "total"}


def test_unreachable_server_falls_back_within_the_deadline(bundle: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8), "RGB").save(frames / f"f{i}.png")
    rc, out, _ = _run(["predict", "--bundle", str(bundle), "--frames", str(frames), "--question", "is it red?",
                         "--server", "http://127.0.0.1:9", "--timeout", "0.5", "--json"], capsys)
    res = json.loads(out)
    assert rc == 0 and res["source"] in ("global", "cache") and "unreachable" in res["error"]


@pytest.mark.parametrize(("make", "flags", "expect"), [
    (lambda p: np.save(p / "x.npy", np.zeros((3, 20, 20, 3), np.uint8)), ["--npy", "{p}/x.npy"],
     "expected [F, 3, 16, 16]"),
    (lambda p: np.save(p / "x.npy", np.zeros((3, 16, 16, 4), np.uint8)), ["--npy", "{p}/x.npy"],
     "expected [F, 3, 16, 16]"),
    (lambda p: (p / "x.npy").write_bytes(b"not numpy"), ["--npy", "{p}/x.npy"], "not a .npy"),
    (lambda p: np.save(p / "x.npy", np.full((2, 3, 16, 16), 2.0, np.float32)), ["--npy", "{p}/x.npy"], "[0, 1]"),
    (lambda p: ((p / "d").mkdir(), (p / "d" / "a.png").write_bytes(b"garbage")), ["--frames", "{p}/d"],
     "a.png: not a readable image"),
    (lambda p: ((p / "d").mkdir(), __import__("PIL.Image").Image.new("L", (16, 16)).save(p / "d" / "a.png")),
     ["--frames", "{p}/d"], "3-channel RGB"),
    (lambda p: ((p / "d").mkdir(), __import__("PIL.Image").Image.new("RGB", (32, 16)).save(p / "d" / "a.png")),
     ["--frames", "{p}/d"], "32x16 px"),
    (lambda p: (p / "d").mkdir(), ["--frames", "{p}/d"], "no images"),
])
def test_bad_frames_are_one_line_errors(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        make: Any, flags: list[str], expect: str) -> None:
    make(tmp_path)
    rc, _, err = _run(["predict", "--bundle", str(bundle), *[f.format(p=tmp_path) for f in flags],
                       "--question", "is it red?", "--offline"], capsys)
    assert rc == 2 and expect in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("question", "expect"), [
    ("   ", "empty"),
    ("is it red " * 10, "tokens long"),
    ("is it \udcff red?", "not valid UTF-8"),
])
def test_bad_questions_are_one_line_errors(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           question: str, expect: str) -> None:
    np.save(tmp_path / "c.npy", np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(SystemExit) if expect == "not valid UTF-8" else _nothing():
        rc, _, err = _run(["predict", "--bundle", str(bundle), "--npy", str(tmp_path / "c.npy"),
                           "--question", question, "--offline"], capsys)
        assert rc == 2 and expect in err and "Traceback" not in err
    if expect == "not valid UTF-8":
        assert expect in capsys.readouterr().err


def test_bad_flags_name_the_flag(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npy = str(bundle / "manifest.json")  # exists: the flags under test are what is refused
    for flags, name in ((["--timeout", "nan"], "--timeout"), (["--threads", "0"], "--threads"),
                        (["--retries", "-1"], "--retries"), (["--global-index", "a,b"], "--global-index"),
                        (["--npy", "missing.npy"], "--npy")):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "--bundle", str(bundle), "--npy", npy, "--question", "q", "--offline", *flags])
        assert exc.value.code == 2 and name in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # refused while parsing, before anything is loaded
        main(["predict", "--bundle", str(bundle), "--npy", npy, "--question", "q", "--server", "ftp://x"])
    assert exc.value.code == 2 and "server URL" in capsys.readouterr().err


def test_replies_for_another_model_or_corrupt_fall_back(bundle: Path, tmp_path: Path, cloud: Any) -> None:
    """Decoding is exercised directly: the live-server cases are in tests/cloud/test_server_client.py."""
    from stablesynth.cloud import framing
    from stablesynth_device.wire import protocol

    client = AdaptClient(None, _copy(bundle, tmp_path))
    with torch.inference_mode():
        theta = {k: v[0] for k, v in cloud.method.adapt(torch.zeros(1, 192)).items()}
    frame = framing.encode(theta, "fp32", "other-model", "7")
    with pytest.raises(protocol.ModelMismatch):
        protocol.decode(frame, client.model_id, client.bundle.model_version)
    res = client.adapt(np.zeros(192, np.float32))
    assert res.source == "global" and np.array_equal(res.params["weight"], client.bundle.global_params["weight"])


class _nothing:  # noqa: N801 (a null context manager named like pytest.raises)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_frame_choice_rule() -> None:
    from stablesynth_device.bundle import Preprocessing

    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 5, 3, "uniform", "middle", 16, 16)
    assert pre.frame_choice(5) == ([0, 2, 4], 2)
    assert pre.frame_choice(2) == ([0, 1], 1)
    assert pre.frame_choice(1) == ([0], 0)
    with pytest.raises(ValueError):
        pre.frame_choice(0)
