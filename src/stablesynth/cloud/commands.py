"""``stablesynth serve`` and ``stablesynth device export|predict``: parse and delegate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stablesynth_device.argtypes import (
    OneLineParser,
    existing_dir,
    existing_file,
    int_at_least,
    non_negative_float,
    output_dir,
    port,
    positive_float,
)
from stablesynth_device.wire.auth import TOKEN_ENV, resolve_token


def _add_token_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--token", default=None,
                        help=f"{what} (visible to every local user in `ps`: prefer --token-file or ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=existing_file("--token-file"), default=None, metavar="FILE",
                        help=f"read the token from FILE (first line); default: ${TOKEN_ENV} if set")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve checkpoints over HTTP (cloud side)",
        description="Serve one or more method checkpoints: POST /v1/models/{id}/adapt takes one 192-float "
                    "frame feature and returns the device's last-layer parameters as a binary frame. "
                    "Also /v1/noop, /v1/models, /healthz, /readyz, /metrics, /docs and the Open Inference Protocol "
                    "(KServe V2) under /v2.")
    serve.add_argument("--checkpoint", type=existing_dir("--checkpoint"), action="append", required=True,
                       metavar="DIR", help="method checkpoint directory (repeat to serve several models)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default: loopback only; any other needs a token or "
                            "--allow-unauthenticated)")
    serve.add_argument("--port", type=port("--port"), default=8000)
    _add_token_arguments(serve, "require 'Authorization: Bearer TOKEN' on /v1/*")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve a non-loopback --host without a token (warned on every start)")
    serve.add_argument("--protect-metrics", action="store_true",
                       help="require the token on /metrics too (default: open, for Prometheus)")
    serve.add_argument("--docs", action="store_true",
                       help="serve /docs and /openapi.json on a non-loopback --host (always on loopback)")
    serve.add_argument("--ssl-certfile", type=existing_file("--ssl-certfile"), default=None, metavar="PEM",
                       help="serve HTTPS with this certificate chain (needs --ssl-keyfile)")
    serve.add_argument("--ssl-keyfile", type=existing_file("--ssl-keyfile"), default=None, metavar="PEM",
                       help="the certificate's private key")
    serve.add_argument("--max-batch", type=int_at_least("--max-batch", 1), default=64,
                       help="most uploads per batched model call")
    serve.add_argument("--max-wait-ms", type=non_negative_float("--max-wait-ms"), default=0.0,
                       help="how long the first request of a batch waits for company (default 0: dispatch "
                            "at once, batching only what is already queued)")
    serve.add_argument("--inline-ms", type=non_negative_float("--inline-ms"), default=1.0,
                       help="model calls expected to take less than this run on the event loop, larger ones "
                            "in a worker thread (default 1.0)")
    serve.add_argument("--torch-threads", type=int_at_least("--torch-threads", 1), default=1,
                       help="PyTorch intra-op threads (default 1; scale out with more processes instead)")
    serve.add_argument("--encode-threads", type=int_at_least("--encode-threads", 1), default=2,
                       help="threads expanding and encoding the Θ_d replies of a batch side by side (default 2)")
    serve.add_argument("--model-id", default=None,
                       help="serve under this id (one checkpoint only; default: the manifest's)")
    serve.add_argument("--workers", type=int_at_least("--workers", 1), default=1,
                       help="server processes on the one port, each batching its own requests (default 1)")
    serve.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]",
                       help="where the model runs (default cpu; checkpoints load on the CPU first)")
    serve.add_argument("--idle-timeout", type=positive_float("--idle-timeout"), default=2.0,
                       help="seconds a new connection may stay silent before its first byte (default 2)")
    serve.add_argument("--header-timeout", type=positive_float("--header-timeout"), default=10.0,
                       help="seconds a connection has to send a request's head (default 10)")
    serve.add_argument("--body-timeout", type=positive_float("--body-timeout"), default=10.0,
                       help="seconds a request has to send its body after the head (default 10)")
    serve.add_argument("--send-timeout", type=positive_float("--send-timeout"), default=10.0,
                       help="seconds a client may leave a reply unread before the connection is aborted (default 10)")
    serve.add_argument("--keep-alive", type=int_at_least("--keep-alive", 1), default=5,
                       help="seconds an idle keep-alive connection is kept (default 5)")
    serve.add_argument("--max-header-bytes", type=int_at_least("--max-header-bytes", 1024), default=16 * 1024,
                       help="largest request head (request line + headers) in bytes; 431 beyond (default 16384)")
    serve.add_argument("--limit-concurrency", type=int_at_least("--limit-concurrency", 1), default=1024,
                       help="open connections or requests beyond which new requests get 503 (default 1024)")
    serve.add_argument("--drain-timeout", type=non_negative_float("--drain-timeout"), default=0.0, metavar="SECONDS",
                       help="on SIGTERM, turn not-ready and finish in-flight requests for up to SECONDS before "
                            "exiting (default 0: exit at once; behind a load balancer use e.g. 10)")
    serve.add_argument("--max-connections-per-client", type=int_at_least("--max-connections-per-client", 1),
                       default=128, metavar="N",
                       help="open connections of one peer address beyond which its new ones get 503 (default 128; "
                            "behind a reverse proxy, raise it to --limit-concurrency)")
    serve.set_defaults(func=_serve)

    device = subparsers.add_parser(
        "device", help="device side: export a bundle, write a benchmark clip as frames",
        description="Build what a device runs. The device itself runs `stablesynth-device predict` "
                    "(the torch-free device package: pip install ./device).")
    dsub = device.add_subparsers(dest="device_command", metavar="COMMAND")
    export = dsub.add_parser(
        "export", help="write the self-contained device bundle of a method checkpoint",
        description="Write a device bundle: the run's stage-1 encoder in ONNX (word table pruned to the task's "
                    "question tokens), the head in ONNX (Θ_d as graph inputs), the tokenizer, preprocessing, "
                    "answer names, global Θ_d and generator weights, with a manifest of checksums and the parity "
                    "with PyTorch measured on the run's real-time clips.")
    export.add_argument("--checkpoint", type=existing_dir("--checkpoint"), required=True, metavar="DIR",
                        help="method checkpoint, e.g. runs/demo/methods/stablesynth")
    export.add_argument("--out", type=output_dir("--out"), required=True, metavar="DIR",
                        help="bundle directory to write")
    export.add_argument("--run-dir", type=existing_dir("--run-dir"), default=None, metavar="DIR",
                        help="the run whose stage1/ holds the encoder (default: two levels above --checkpoint)")
    export.add_argument("--int8", action="store_true",
                        help="also write a dynamically quantised encoder (encoder.int8.onnx) and measure its accuracy")
    export.add_argument("--no-parity", action="store_true",
                        help="skip the parity measurement on the real-time clips (the manifest then says so)")
    export.set_defaults(func=_export)

    clip = dsub.add_parser(
        "clip", help="write one real-time benchmark clip as PNG frames for stablesynth-device",
        description="Render real-time clip I of a device of the embedded easy-VQA benchmark as that device "
                    "captured it, write its frames as PNG files and clip.json (question, true answer, frame "
                    "choices), and print the stablesynth-device command that predicts it.")
    clip.add_argument("--run-dir", type=Path, default=Path("runs/demo"), metavar="DIR",
                      help="the demo run (default runs/demo)")
    clip.add_argument("--device", type=int_at_least("--device", 0), default=0, help="benchmark device id (default 0)")
    clip.add_argument("--clip", type=int_at_least("--clip", 0), default=0, metavar="I",
                      help="real-time clip, 0-based (default 0)")
    clip.add_argument("--out", type=output_dir("--out"), required=True, metavar="DIR", help="folder for the frames")
    clip.set_defaults(func=_clip)
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
    import sys

    from stablesynth.cloud.exposure import is_loopback, unauthenticated_warning
    from stablesynth.cloud.limits import ServeLimits
    from stablesynth.cloud.server import ServeSpec, load_models, serve_checkpoints

    limits = ServeLimits(max_header_bytes=args.max_header_bytes, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout, send_timeout=args.send_timeout,
                         keep_alive_timeout=args.keep_alive, idle_timeout=args.idle_timeout,
                         limit_concurrency=args.limit_concurrency,
                         max_connections_per_client=args.max_connections_per_client)
    token = resolve_token(args.token, args.token_file)
    warning = unauthenticated_warning(args.host, token, args.allow_unauthenticated)
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    if args.protect_metrics and token is None:
        raise ValueError("--protect-metrics needs a token (--token-file FILE or $STABLESYNTH_TOKEN)")
    tls = _check_tls(args.ssl_certfile, args.ssl_keyfile)
    device = _resolve_device(args.device)
    spec = ServeSpec([str(c) for c in args.checkpoint], args.model_id, device, token, args.max_batch,
                     args.max_wait_ms, args.inline_ms, args.torch_threads, limits.to_dict(), args.encode_threads,
                     drain_timeout=args.drain_timeout, docs=args.docs or is_loopback(args.host),
                     protect_metrics=args.protect_metrics, **tls)
    models = load_models(spec.checkpoints, spec.model_id, device)  # validates before any worker starts
    if warning:
        print(warning, file=sys.stderr, flush=True)
    scheme = "https" if tls else "http"
    for m in models.values():
        print(f"serving {m.model_id}@{m.version} ({m.method_name}, K={m.num_classes}, {device}) "
              f"on {scheme}://{args.host}:{args.port} with {args.workers} worker(s)", flush=True)
    serve_checkpoints(spec, args.host, args.port, args.workers, models if args.workers == 1 else None)
    return 0


def _check_tls(certfile: Path | None, keyfile: Path | None) -> dict[str, str]:
    """The TLS files as ServeSpec fields, after checking they load (a one-line error, not uvicorn's traceback)."""
    if certfile is None or keyfile is None:
        return {}
    import ssl

    try:
        # An empty password: an encrypted key is refused here instead of prompting on the terminal.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=b"")
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a matching PEM certificate "
                         f"and key ({exc})") from None
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def _export(args: argparse.Namespace) -> int:
    from stablesynth.cloud.clip import RunDirError, load_benchmark, load_encoder
    from stablesynth.cloud.export import export_device_bundle
    from stablesynth.cloud.server import load_cloud_model

    run_dir = args.run_dir or args.checkpoint.resolve().parent.parent
    model = load_cloud_model(args.checkpoint)
    stage1, manifest = load_encoder(run_dir)
    bench = load_benchmark(run_dir, manifest.get("benchmark"))
    if bench.num_classes != model.num_classes:
        raise RunDirError(f"{args.checkpoint} has K={model.num_classes}, the benchmark of {run_dir} "
                          f"{bench.num_classes}: pass the --run-dir it was trained in")
    from stablesynth.assets import minilm_dir
    from stablesynth.data.benchmark import FRAME_MEAN, FRAME_STD
    from stablesynth.data.clip_loader import make_loader

    cfg = bench.cfg
    preprocessing = {"image_size": cfg.image_size, "mean": list(FRAME_MEAN), "std": list(FRAME_STD),
                     "frames_per_clip": cfg.frames_per_clip, "global_frames": cfg.global_frames,
                     "global_sampling": "uniform", "upload_frame": "middle", "max_question_len": cfg.max_question_len}
    questions = [q for split in ("train", "test") for q in bench.data.split(split).questions]
    tokenizer_json = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    batches = None if args.no_parity else (lambda: make_loader(bench, "realtime", "all", batch_size=64))
    out = export_device_bundle(model, stage1, preprocessing, bench.answer_names, questions, tokenizer_json, args.out,
                               batches=batches, int8=args.int8, encoder_name=str(manifest.get("encoder", "")),
                               progress=lambda msg: print(msg, flush=True))
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    print(f"device bundle for {model.model_id}@{model.version} (K={model.num_classes}) written to {out}")
    if parity:
        line = (f"parity on {parity['clips']} real-time clips: encoder max |ONNX - PyTorch| "
                f"{parity['encoder_max_abs_diff']:.1e}, answers equal in {100 * parity['answer_agreement']:.2f} %")
        if "int8" in parity:
            q = parity["int8"]
            lo, hi = q["accuracy_change_interval_points"]
            line += f"; int8 accuracy change {q['accuracy_change_points']:+.2f} pt [{lo:+.2f}, {hi:+.2f}]"
        print(line)
    return 0


def _clip(args: argparse.Namespace) -> int:
    from stablesynth.cloud.clip import write_clip

    info = write_clip(args.run_dir, args.device, args.clip, args.out)
    print(f"device {info['device']} clip {info['clip']}: {info['question']!r} (true answer: {info['true_answer']}); "
          f"frames in {args.out}")
    gi = ",".join(str(i) for i in info["global_index"])
    print(f"stablesynth-device predict --bundle BUNDLE --frames {args.out} --question {json.dumps(info['question'])} "
          f"--upload-index {info['upload_index']} --global-index {gi} [--server URL | --offline]")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m stablesynth.cloud.commands serve|device ...``: the serving commands alone
    (a server process that imports nothing of training or evaluation)."""
    from stablesynth.commandline import run_parsed

    parser = OneLineParser(prog="stablesynth-serving")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return run_parsed(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
