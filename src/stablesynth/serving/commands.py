"""``stablesynth serve`` and ``stablesynth device export|predict``: parse and delegate."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from stablesynth.serving.protocol import ENCODINGS

#: Environment variable holding the bearer token (kept off the command line, where `ps` shows it).
TOKEN_ENV = "STABLESYNTH_TOKEN"


def _add_token_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--token", default=None,
                        help=f"{what} (visible to every local user in `ps`: prefer --token-file or ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                        help=f"read the token from FILE (first line); default: ${TOKEN_ENV} if set")


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from --token, else --token-file, else $STABLESYNTH_TOKEN, else None."""
    if token is not None and token_file is not None:
        raise ValueError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--token-file {token_file}: {exc}") from None
        token = lines[0].strip() if lines else ""
    elif token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
        raise ValueError("the token must be non-empty printable ASCII without spaces")
    return token


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve checkpoints over HTTP (cloud side)",
        description="Serve one or more method checkpoints: POST /v1/models/{id}/adapt takes one 192-float "
                    "frame feature and returns the device's last-layer parameters as a binary frame. "
                    "Also /v1/noop, /v1/models, /healthz, /readyz, /metrics and /docs.")
    serve.add_argument("--checkpoint", type=Path, action="append", required=True, metavar="DIR",
                       help="method checkpoint directory (repeat to serve several models)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    _add_token_arguments(serve, "require 'Authorization: Bearer TOKEN' on /v1/*")
    serve.add_argument("--max-batch", type=int, default=64, help="most uploads per batched model call")
    serve.add_argument("--max-wait-ms", type=float, default=0.0,
                       help="how long the first request of a batch waits for company (default 0: dispatch "
                            "at once, batching only what is already queued)")
    serve.add_argument("--inline-ms", type=float, default=1.0,
                       help="model calls expected to take less than this run on the event loop, larger ones "
                            "in a worker thread (default 1.0)")
    serve.add_argument("--torch-threads", type=int, default=1,
                       help="PyTorch intra-op threads (default 1; scale out with more processes instead)")
    serve.add_argument("--encode-threads", type=int, default=2,
                       help="threads expanding and encoding the Θ_d replies of a batch side by side (default 2)")
    serve.add_argument("--model-id", default=None,
                       help="serve under this id (one checkpoint only; default: the manifest's)")
    serve.add_argument("--workers", type=int, default=1,
                       help="server processes on the one port, each batching its own requests (default 1)")
    serve.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]",
                       help="where the model runs (default cpu; checkpoints load on the CPU first)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection has to send a request's head (default 10)")
    serve.add_argument("--body-timeout", type=float, default=10.0,
                       help="seconds a request has to send its body after the head (default 10)")
    serve.add_argument("--send-timeout", type=float, default=10.0,
                       help="seconds a client may leave a reply unread before the connection is aborted (default 10)")
    serve.add_argument("--keep-alive", type=int, default=5,
                       help="seconds an idle keep-alive connection is kept (default 5)")
    serve.add_argument("--max-header-bytes", type=int, default=16 * 1024,
                       help="largest request head (request line + headers) in bytes; 431 beyond (default 16384)")
    serve.add_argument("--limit-concurrency", type=int, default=1024,
                       help="open connections or requests beyond which new requests get 503 (default 1024)")
    serve.set_defaults(func=_serve)

    device = subparsers.add_parser("device", help="device side: export a bundle, predict via a server",
                                   description="Device-side tools.")
    dsub = device.add_subparsers(dest="device_command", metavar="COMMAND")
    export = dsub.add_parser(
        "export", help="write the device bundle of a checkpoint",
        description="Write a device bundle: ONNX device model (Θ_d as graph inputs), static head, global "
                    "parameters and generator weights, with a manifest of model id/version and checksums.")
    export.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    export.set_defaults(func=_export)

    predict = dsub.add_parser(
        "predict", help="upload one frame feature, get Θ_d, predict with ONNX Runtime",
        description="Predict one clip on the device. The upload is one frame of the clip's features; "
                    "F_g is the mean of the clip's frames. Falls back to cached or global parameters if "
                    "the server fails, and prints which source was used.")
    predict.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    predict.add_argument("--bundle", type=Path, required=True, metavar="DIR")
    src = predict.add_mutually_exclusive_group(required=True)
    src.add_argument("--feature-file", type=Path, metavar="F",
                     help=".npy or .json with the clip's per-frame features, shape [N_f, 192] (or [192])")
    src.add_argument("--clip", type=int, metavar="I",
                     help="real-time clip I (0-based) of --device in the embedded easy-VQA benchmark: rendered, "
                          "encoded with --run-dir's stage-1 encoder, its upload frame sent, F_g predicted")
    predict.add_argument("--run-dir", type=Path, default=Path("runs/demo"), metavar="DIR",
                         help="with --clip: the demo run whose stage-1 encoder the device uses (default runs/demo)")
    predict.add_argument("--device", type=int, default=0, help="with --clip: the benchmark device id (default 0)")
    predict.add_argument("--upload-index", type=int, default=None,
                         help="which frame to upload (default: 0 for --feature-file, the clip's own for --clip)")
    predict.add_argument("--encoding", choices=ENCODINGS, default="fp32")
    predict.add_argument("--timeout", type=float, default=2.0,
                         help="deadline of the whole exchange in seconds, retries included (default 2)")
    predict.add_argument("--retries", type=int, default=2)
    _add_token_arguments(predict, "send 'Authorization: Bearer TOKEN'")
    predict.set_defaults(func=_predict)
    device.set_defaults(func=lambda args: device.print_help() or 2)


def _resolve_device(spec: str) -> str:
    try:
        from stablesynth.accelerator import resolve_device
    except ModuleNotFoundError:  # an install without accelerator support serves on the CPU only
        if spec != "cpu":
            raise ValueError(f"--device {spec}: this installation serves on the CPU only") from None
        return "cpu"
    return str(resolve_device(spec))


def _serve(args: argparse.Namespace) -> int:
    from stablesynth.serving.limits import ServeLimits
    from stablesynth.serving.server import ServeSpec, load_models, serve_checkpoints

    limits = ServeLimits(max_header_bytes=args.max_header_bytes, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout, send_timeout=args.send_timeout,
                         keep_alive_timeout=args.keep_alive,
                         limit_concurrency=args.limit_concurrency)
    device = _resolve_device(args.device)
    spec = ServeSpec([str(c) for c in args.checkpoint], args.model_id, device,
                     resolve_token(args.token, args.token_file), args.max_batch, args.max_wait_ms,
                     args.inline_ms, args.torch_threads, limits.to_dict(), args.encode_threads)
    models = load_models(spec.checkpoints, spec.model_id, device)  # validates before any worker starts
    for m in models.values():
        print(f"serving {m.model_id}@{m.version} ({m.method_name}, K={m.num_classes}, {device}) "
              f"on http://{args.host}:{args.port} with {args.workers} worker(s)", flush=True)
    serve_checkpoints(spec, args.host, args.port, args.workers, models if args.workers == 1 else None)
    return 0


def _export(args: argparse.Namespace) -> int:
    from stablesynth.serving.client import export_device_bundle
    from stablesynth.serving.server import load_cloud_model

    model = load_cloud_model(args.checkpoint)
    out = export_device_bundle(model, args.out)
    print(f"device bundle for {model.model_id}@{model.version} (K={model.num_classes}) written to {out}")
    return 0


def load_frames(path: Path) -> torch.Tensor:
    """Per-frame features [N_f, 192] from ``.npy`` or ``.json`` (a list, or {"frames": [...]})."""
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif path.suffix == ".json":
        obj = json.loads(path.read_text())
        arr = np.asarray(obj["frames"] if isinstance(obj, dict) else obj, dtype=np.float32)
    else:
        raise ValueError(f"{path}: use a .npy or .json feature file")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 192:
        raise ValueError(f"{path}: expected features of shape [N_f, 192], got {list(arr.shape)}")
    return torch.from_numpy(arr)


def _predict(args: argparse.Namespace) -> int:
    from stablesynth.serving.client import DeviceClient

    clip = None
    if args.clip is not None:
        from stablesynth.serving.clip import clip_features

        clip = clip_features(args.run_dir, args.device, args.clip)
        frames = clip.frames
        upload_index = clip.upload_index if args.upload_index is None else args.upload_index
        f_g = clip.f_g
    else:
        frames = load_frames(args.feature_file)
        upload_index = 0 if args.upload_index is None else args.upload_index
        f_g = frames.mean(0)
    if not 0 <= upload_index < frames.shape[0]:
        raise ValueError(f"--upload-index {upload_index} outside the clip's {frames.shape[0]} frames")
    with DeviceClient(args.server, args.bundle, encoding=args.encoding, timeout=args.timeout,
                      retries=args.retries, token=resolve_token(args.token, args.token_file)) as client:
        if clip is not None and client.bundle.num_classes != len(clip.answers):
            raise ValueError(f"bundle has K={client.bundle.num_classes} but the benchmark has "
                             f"{len(clip.answers)} answers: export the bundle from this run's checkpoint")
        logits, res = client.predict(f_g, frames[upload_index])
    prediction = int(np.argmax(logits[0]))
    out: dict[str, object] = {"prediction": prediction}
    if clip is not None:
        out.update({"answer": clip.answers[prediction], "true_answer": clip.true_answer,
                    "correct": clip.true_answer is not None and prediction == clip.label,
                    "question": clip.question, "device": clip.device, "device_seen": clip.seen,
                    "clip": clip.clip, "upload_index": upload_index, "global_index": clip.global_index})
    out.update({"source": res.source, "error": res.error, "encoding": args.encoding, "bytes_up": 768,
                "bytes_down": res.bytes_down, "latency_ms": round(res.latency_ms, 3),
                "model": f"{client.model_id}@{client.bundle.model_version}"})
    if clip is not None:
        ok = "right" if out["correct"] else "wrong"
        print(f"device {clip.device} clip {clip.clip}: {clip.question!r} -> {out['answer']} "
              f"(true: {clip.true_answer}, {ok}); Θ_d from {res.source}, {res.bytes_down} B down, "
              f"{res.latency_ms:.1f} ms")
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m stablesynth.serving.commands serve|device ...``: the serving commands alone
    (a server process that imports nothing of training or evaluation)."""
    from stablesynth.commandline import run_parsed

    parser = argparse.ArgumentParser(prog="stablesynth-serving")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return run_parsed(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
