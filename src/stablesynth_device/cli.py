"""``stablesynth-device``: the device's command line (no PyTorch).

``stablesynth-device predict --bundle B (--frames DIR | --video FILE | --npy FILE) --question TEXT
[--server URL | --offline]`` encodes the clip, uploads one frame feature, decodes the reply,
predicts, and prints the answer, where Θ_d came from and the timings (``--json`` for JSON).
``stablesynth-device verify --bundle B`` checks a bundle and prints its manifest's figures.
Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stablesynth_device.argtypes import OneLineParser, existing_dir, existing_file, int_at_least, positive_float
from stablesynth_device.bundle import Bundle, BundleError
from stablesynth_device.frames import FrameError
from stablesynth_device.runtime import InputError
from stablesynth_device.wire.auth import TOKEN_ENV, resolve_token
from stablesynth_device.wire.protocol import ENCODINGS


def _index_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--global-index {text!r}: expected comma-separated frame numbers") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"--global-index {text!r}: expected frame numbers >= 0")
    return out


def _question(text: str) -> str:
    # argv arrives decoded with surrogateescape: a lone surrogate is a byte that was not UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("--question: the text is not valid UTF-8") from None
    return text


def _server_url(text: str) -> str:
    from stablesynth_device.client import check_server_url

    try:
        return check_server_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--server {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="stablesynth-device",
        description="The device half of StableSynthNet: encode a clip with ONNX Runtime, upload one 192-float "
                    "frame feature, get the last layer's weights from the cloud, predict. No PyTorch needed.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "predict", help="answer a question about a clip",
        description="Encode the clip's frames with the question, upload one frame feature (768 bytes) to the "
                    "cloud, decode Θ_d and predict. On a timeout, a refusal, or a reply that is corrupt or for "
                    "another model, the device predicts with its last good Θ_d or the bundle's global one and "
                    "says why. --video needs PyAV: pip install 'stablesynth-device[video]'.")
    p.add_argument("--bundle", type=existing_dir("--bundle"), required=True, metavar="DIR",
                   help="device bundle (written by stablesynth device export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames", type=existing_dir("--frames"), metavar="DIR",
                     help="folder of RGB frames at the bundle's image size, read in name order (png, jpg, ...)")
    src.add_argument("--video", type=existing_file("--video"), metavar="FILE",
                     help="a video file: evenly spaced frames, centre-cropped and resized (needs PyAV)")
    src.add_argument("--npy", type=existing_file("--npy"), metavar="FILE",
                     help="frames as a .npy array [F, S, S, 3] or [F, 3, S, S], uint8 0-255 or float 0-1")
    p.add_argument("--question", type=_question, required=True, metavar="TEXT")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", type=_server_url, metavar="URL",
                       help="the cloud service, e.g. http://127.0.0.1:8000 or https://HOST:PORT")
    where.add_argument("--offline", action="store_true",
                       help="do not contact the cloud: predict with the last good Θ_d, else the global one")
    p.add_argument("--encoding", choices=ENCODINGS, default="fp32", help="how Θ_d travels (default fp32)")
    p.add_argument("--timeout", type=positive_float("--timeout"), default=2.0,
                   help="deadline of the whole exchange in seconds, retries included (default 2)")
    p.add_argument("--retries", type=int_at_least("--retries", 0), default=2, help="extra attempts (default 2)")
    p.add_argument("--upload-index", type=int_at_least("--upload-index", 0), default=None, metavar="I",
                   help="the frame to upload (default: the bundle's rule, the middle frame)")
    p.add_argument("--global-index", type=_index_list, default=None, metavar="I,J,..",
                   help="the frames averaged into F_g (default: the bundle's rule, D evenly spaced frames)")
    p.add_argument("--int8", action="store_true", help="use the bundle's int8 encoder")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=1, help="ONNX Runtime threads (default 1)")
    p.add_argument("--token", default=None, help=f"bearer token (visible in `ps`: prefer --token-file or ${TOKEN_ENV})")
    p.add_argument("--token-file", type=existing_file("--token-file"), default=None, metavar="FILE",
                   help="read the token from FILE's first line")
    p.add_argument("--ca-file", type=existing_file("--ca-file"), default=None, metavar="PEM",
                   help="trust the https server certificates signed by these CA certificates (default: the "
                        "system's trust store)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    p.set_defaults(func=_predict)
    v = sub.add_parser("verify", help="check a bundle's files and print its manifest's figures",
                       description="Verify every file of a bundle against its manifest (size and SHA-256) and "
                                   "print the model, the files and the measured parity figures.")
    v.add_argument("--bundle", type=existing_dir("--bundle"), required=True, metavar="DIR")
    v.set_defaults(func=_verify)
    return parser


def _frames(args: argparse.Namespace, bundle: Bundle) -> Any:
    from stablesynth_device import frames

    if args.frames is not None:
        return frames.load_images(args.frames, bundle.preprocessing)
    if args.video is not None:
        return frames.load_video(args.video, bundle.preprocessing)
    return frames.load_npy(args.npy, bundle.preprocessing)


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Run one prediction as ``predict`` does; returns what it prints."""
    from stablesynth_device.client import AdaptClient, check_server_url
    from stablesynth_device.runtime import DeviceRuntime, clip_feature

    t_start = time.perf_counter()
    token = resolve_token(args.token, args.token_file)
    server = None if args.offline else check_server_url(args.server)
    bundle = Bundle.load(args.bundle)
    clip = _frames(args, bundle)
    n = clip.shape[0]
    g_index, up = bundle.preprocessing.frame_choice(n)
    if args.global_index is not None:
        g_index = args.global_index
    if args.upload_index is not None:
        up = args.upload_index
    if max(g_index) >= n or up >= n:
        raise InputError(f"frame indices {g_index} / upload {up} outside the clip's {n} frames")
    runtime = DeviceRuntime(bundle, threads=args.threads, int8=args.int8)
    _, _, unknown = runtime.tokenizer.encode(args.question)
    t0 = time.perf_counter()
    features = runtime.encode(clip, args.question)
    encode_ms = (time.perf_counter() - t0) * 1e3
    f_g = clip_feature(features, g_index)
    with AdaptClient(server, bundle, encoding=args.encoding, timeout=args.timeout, retries=args.retries,
                     token=token, ca_file=args.ca_file) as client:
        res = client.adapt(features[up])
    params, source = res.params, res.source
    res_error, bytes_down, adapt_ms, attempts = res.error, res.bytes_down, res.latency_ms, res.attempts
    t1 = time.perf_counter()
    logits = runtime.predict(f_g, params["weight"], params["bias"])[0]
    head_ms = (time.perf_counter() - t1) * 1e3
    k = int(logits.argmax())
    return {
        "answer": bundle.answers[k], "prediction": k, "question": args.question,
        "source": source, "error": res_error, "encoding": args.encoding,
        "model": f"{bundle.model_id}@{bundle.model_version}", "encoder": "int8" if args.int8 else "fp32",
        "frames": n, "upload_index": up, "global_index": list(g_index), "unknown_tokens": unknown,
        "bytes_up": 768 if server is not None else 0, "bytes_down": bytes_down, "attempts": attempts,
        "timings_ms": {"encode": round(encode_ms, 3), "adapt": round(adapt_ms, 3), "head": round(head_ms, 3),
                       "total": round((time.perf_counter() - t_start) * 1e3, 3)},
    }


def _predict(args: argparse.Namespace) -> int:
    out = predict(args)
    if args.json:
        print(json.dumps(out))
        return 0
    t = out["timings_ms"]
    why = f" ({out['error']})" if out["error"] else ""
    note = f"; {out['unknown_tokens']} word piece(s) outside the model's vocabulary" if out["unknown_tokens"] else ""
    print(f"{out['answer']}  [Θ_d from {out['source']}{why}; encode {t['encode']:.1f} ms, adapt {t['adapt']:.1f} ms, "
          f"head {t['head']:.2f} ms, total {t['total']:.0f} ms{note}]")
    return 0


def _verify(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    print(f"{args.bundle}: {bundle.model_id}@{bundle.model_version}, K={bundle.num_classes}, method {m.get('method')}, "
          f"encodings {', '.join(bundle.encodings)}")
    for name, entry in m["files"].items():
        print(f"  {name:24s} {entry['bytes']:>10,d} B  sha256 {entry['sha256'][:16]}…")
    print(f"  parity: {json.dumps(m.get('parity'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (BundleError, FrameError, InputError, ValueError, OSError) as exc:
        print(f"stablesynth-device: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
