"""`stablesynth bench ...` and `stablesynth payload`: benchmarks that print ratios against a baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from stablesynth.accelerator import add_device_argument
from stablesynth_device.argtypes import existing_dir, int_at_least, output_dir, positive_float


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="benchmarks: ablations, tuning, device counts, serving, training and device speed",
        description="Benchmarks; each prints its figures next to a baseline measured in the same run.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")

    ab = bsub.add_parser(
        "ablate", help="StableSynthNet with one module/choice changed at a time, over seeds",
        description=("Reuses the demo run in --out (stage 1 and feature caches; runs them if missing), then trains "
                     "StableSynthNet variants in stage 2: each module off in turn, convex vs literal template "
                     "update, fusion direction, generators full/lowrank/film, what stage 2 trains, D = 1..N_f "
                     "frames, and how the encoder is trained (camera-like pretraining, stage-1 colour and shape "
                     "heads: each trains its own stage 1 in --out/ablate/). Writes "
                     "ablation.json, ablation.png and adds an Ablations section to report.md."))
    ab.add_argument("--out", type=output_dir("--out"), default=Path("runs/demo"), help="the demo's output folder")
    ab.add_argument("--config", type=Path, default=None, help="run config (default: the packaged demo config)")
    ab.add_argument("--quick", action="store_true", help="use the quick config")
    ab.add_argument("--seeds", type=int_at_least("--seeds", 1), default=3, help="stage-2 seeds per variant (default 3)")
    ab.add_argument("--only", nargs="*", default=None,
                    help="only these groups: reference modules templates generator stage2 frames encoder")
    add_device_argument(ab)
    ab.set_defaults(func=_ablate)

    sv = bsub.add_parser(
        "serve", help="adaptations/s and latency of the HTTP service on loopback",
        description=("Starts the server on 127.0.0.1 in a subprocess and drives it with a bounded load "
                     "generator at several concurrency levels; compares the adapt endpoint with a no-op endpoint "
                     "of the same server, the in-process call and DUET's full generator."))
    sv.add_argument("--checkpoint", type=existing_dir("--checkpoint"), default=None,
                    help="a method checkpoint (default: an untrained K=1501 model, the paper's size)")
    sv.add_argument("--out", type=output_dir("--out"), default=None, help="write serve.json in this folder")
    sv.add_argument("--requests", type=int_at_least("--requests", 1), default=4000,
                    help="requests per concurrency level (bounded)")
    sv.add_argument("--concurrency", type=int_at_least("--concurrency", 1), nargs="+", default=[1, 8, 64])
    sv.add_argument("--time-cap", type=positive_float("--time-cap"), default=20.0,
                    help="seconds per row at most (default 20)")
    sv.add_argument("--clients", type=int_at_least("--clients", 1), default=2,
                    help="load-generator processes (default 2)")
    sv.set_defaults(func=_serve)

    tr = bsub.add_parser(
        "train", help="clips/s and s/epoch of stage 1 and feature extraction at the paper's sizes",
        description=("Times the stage-1 training step and feature extraction on synthetic clips of the preset's "
                     "shapes (random weights; needs only PyTorch) and prints clips/s and seconds per MSRVTT-QA "
                     "epoch beside the paper's 897 s/epoch on an A100."))
    from stablesynth.bench.train import add_arguments as _train_arguments

    _train_arguments(tr)
    tr.set_defaults(func=_train)

    tu = bsub.add_parser(
        "tune", help="choose stage-2 hyper-parameters on validation clips (held-out history of seen devices)",
        description=("Reuses the demo run in --out (stage 1 and feature caches), trains each method's grid of "
                     "stage-2 settings on the training history and scores it on the validation clips (each seen "
                     "device's last benchmark.validation_per_device history clips); the real-time clips the report "
                     "scores are never used. Writes tune.json; put the chosen values into the run config."))
    tu.add_argument("--out", type=output_dir("--out"), default=Path("runs/demo"), help="the demo's output folder")
    tu.add_argument("--config", type=Path, default=None, help="run config or packaged name (default: demo)")
    tu.add_argument("--methods", nargs="*", default=None, help="methods to tune (default: f_hyper duet stablesynth)")
    add_device_argument(tu)
    tu.set_defaults(func=_tune)

    dv = bsub.add_parser(
        "device", help="device half: bundle size, encoder/head latency vs PyTorch, RSS, install size, shaped link",
        description="Measure the device half on this machine, PyTorch eager on the same clips in the same run: "
                    "bundle sizes, encoder latency (allinone-cpu-stem from the bundle, allinone-ti at the paper's "
                    "size) at 1 thread and all cores, the head, the device process's peak RSS, the device-only "
                    "environment's installed size against the full one, int8 accuracy (from the export), and the "
                    "round trip over a link shaped by tc to Table 5's bandwidths (skipped where not permitted).")
    dv.add_argument("--bundle", type=existing_dir("--bundle"), required=True, metavar="DIR",
                    help="a bundle exported with --int8")
    dv.add_argument("--checkpoint", type=existing_dir("--checkpoint"), default=None, metavar="DIR",
                    help="the method checkpoint the bundle came from (the stage-1 encoder and the served model)")
    dv.add_argument("--out", type=output_dir("--out"), default=Path("runs/bench-device"), metavar="DIR")
    dv.add_argument("--iters", type=int_at_least("--iters", 1), default=50, help="timed clips per row (default 50)")
    dv.add_argument("--device-venv", type=existing_dir("--device-venv"), default=None, metavar="DIR",
                    help="an existing device-only environment (default: a fresh one with pip install ./device)")
    dv.add_argument("--no-ti", action="store_true", help="skip the allinone-ti rows")
    dv.set_defaults(func=_device)

    ds = bsub.add_parser(
        "devices", help="unseen-device accuracy vs the number of seen devices at a fixed total of history clips",
        description=("For each number of seen devices (8 ... 256 by default) and each benchmark seed, draws a "
                     "benchmark whose seen devices share --total-history history clips (more devices, fewer clips "
                     "each) and --unseen held-out devices, extracts features with the frozen stage-0 encoder, "
                     "trains the global head on them and every method from it, and scores the unseen devices. "
                     "Writes devices.json and devices.png to --out; finished points are kept in --out/points, so "
                     "a second run resumes."))
    ds.add_argument("--out", type=output_dir("--out"), default=Path("runs/bench-devices"), help="output folder")
    ds.add_argument("--config", type=Path, default=Path("demo"),
                    help="the run config whose camera ranges and stage-2 settings every point uses (default: demo, "
                         "the harsh cameras)")
    ds.add_argument("--counts", type=int_at_least("--counts", 2), nargs="+", default=None,
                    help="numbers of seen devices (default: 8 16 32 64 128 256)")
    ds.add_argument("--seeds", type=int_at_least("--seeds", 1), default=3, help="benchmark seeds (default 3)")
    ds.add_argument("--total-history", type=int_at_least("--total-history", 1), default=3840,
                    help="history clips shared by the seen devices at every point (default 3840)")
    ds.add_argument("--unseen", type=int_at_least("--unseen", 1), default=16, help="held-out devices (default 16)")
    ds.add_argument("--realtime", type=int_at_least("--realtime", 1), default=60,
                    help="real-time clips per unseen device (default 60)")
    ds.add_argument("--methods", nargs="+", default=None,
                    help="methods per point (default: fine_tune f_hyper stablesynth stage2_control em_prior "
                         "label_shift t3a tent_sar)")
    add_device_argument(ds)
    ds.set_defaults(func=_devices)

    hr = bsub.add_parser(
        "headroom",
        help="where the unseen-device headroom goes (ceilings, Θ_d vs per-device optima) and what recovers it",
        description=("For each benchmark seed, opens the demo's run folder of that seed (--out, then --out/seeds/K: "
                     "run `stablesynth demo --config C --seeds N --out DIR` first, or let this train what is "
                     "missing), measures the ceilings of a Θ_d generator on unseen and seen devices (per-device bias, "
                     "last layer, last layer with the usage skew weighted out, the history answer prior, per-device "
                     "fine-tuning), how each hypernetwork's Θ_d lines up with the per-device optima, what one "
                     "uploaded frame carries (device probe, colour-cast regression), and trains the candidate fixes "
                     "(the generator pulled towards per-device optima, on-device corrections after Θ_d). The best "
                     "cloud method is chosen on validation clips. Writes headroom.json and headroom.png to --out."))
    hr.add_argument("--out", type=Path, default=Path("runs/harsh"), help="the demo's run folder (default runs/harsh)")
    hr.add_argument("--config", type=Path, default=Path("harsh"),
                    help="the run config (default: harsh, the profile the study is about)")
    hr.add_argument("--seeds", type=int_at_least("--seeds", 1), default=3, help="benchmark seeds (default 3)")
    hr.add_argument("--only", nargs="+", default=None, metavar="KEY",
                    help="train and score only these candidates (default: all; the keys are headroom.json's "
                         "method keys, e.g. fine_tune stablesynth stablesynth+opt10 stablesynth+sim256)")
    add_device_argument(hr)
    hr.set_defaults(func=_headroom)

    pay = sub.add_parser(
        "payload", help="bytes up/down and transfer time for the paper's presets (Table 5)",
        description=("For each paper preset: the upload (one 192-float feature) and the download per encoding "
                     "(fp32, fp16, int8, generator factors, driver only) with transfer times at 5/15/50/100 MB/s "
                     "next to the paper's Table 5."))
    pay.add_argument("--preset", default=None, help="one preset (default: all)")
    pay.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pay.set_defaults(func=_payload)


def _ablate(args: argparse.Namespace) -> int:
    from stablesynth.bench.ablate import run_ablation
    from stablesynth.experiment.demo import load_run_config

    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    cfg = load_run_config(args.config, quick=args.quick)
    run_ablation(cfg, args.out, seeds=args.seeds, only=args.only, device=args.device)
    return 0


def _headroom(args: argparse.Namespace) -> int:
    from stablesynth.bench.headroom import (
        HEADROOM_FILE,
        PLOT_FILE,
        format_table,
        run_headroom_bench,
        select_candidates,
    )
    from stablesynth.experiment.demo import load_run_config

    summary = run_headroom_bench(load_run_config(args.config), args.out, seeds=args.seeds, device=args.device,
                                 candidates=select_candidates(args.only))
    print(format_table(summary))
    print(f"wrote {args.out / HEADROOM_FILE} and {args.out / PLOT_FILE} in {summary['seconds']:.0f} s")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from stablesynth.bench.devices import DEFAULT_COUNTS, DEFAULT_METHODS, format_table, run_devices_bench
    from stablesynth.experiment.demo import load_run_config

    summary = run_devices_bench(load_run_config(args.config), args.out, counts=args.counts or DEFAULT_COUNTS,
                                seeds=args.seeds, total_history=args.total_history, n_unseen=args.unseen,
                                realtime_per_device=args.realtime, methods=args.methods or DEFAULT_METHODS,
                                device=args.device)
    print(format_table(summary))
    print(f"wrote {args.out / 'devices.json'} and {args.out / 'devices.png'} in {summary['seconds']:.0f} s")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from stablesynth.bench.tune import run_tuning
    from stablesynth.experiment.demo import load_run_config

    run_tuning(load_run_config(args.config), args.out, methods=args.methods, device=args.device)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from stablesynth.bench.serve import format_table, run_serve_benchmark

    results = run_serve_benchmark(args.checkpoint, args.out, requests=args.requests, concurrency=args.concurrency,
                                  time_cap_s=args.time_cap, clients=args.clients)
    print(format_table(results))
    return 0


def _train(args: argparse.Namespace) -> int:
    from stablesynth.bench.train import run_from_args

    return run_from_args(args)


def _device(args: argparse.Namespace) -> int:
    from stablesynth.bench.device import run_device_benchmark, summary

    if args.iters < 1:
        raise ValueError(f"--iters {args.iters}: must be >= 1")
    res = run_device_benchmark(args.bundle, args.checkpoint, args.out, iters=args.iters,
                               device_venv=args.device_venv, ti=not args.no_ti)
    print(summary(res))
    print(f"wrote {args.out / 'device.json'}")
    return 0


def _payload(args: argparse.Namespace) -> int:
    from stablesynth.models.payload import payload_main

    return payload_main(args.preset, args.json)
