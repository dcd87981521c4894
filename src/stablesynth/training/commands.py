"""`stablesynth demo`: the main job on the embedded easy-VQA device benchmark."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train every method on the embedded easy-VQA device benchmark and write the report",
        description=(
            "Runs stage 1 (encoder + head), caches per-frame features, trains every method in stage 2 "
            "(F-linear, Fine-tuning, F-hyper, DUET, StableSynthNet), evaluates on every device's real-time "
            "clips and writes results.json, report.md and PNG plots to --out. A second run with the same "
            "--out reuses finished stages unless --fresh is given."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("--config", type=Path, default=None,
                   help="a run config (YAML/TOML); default: the packaged demo config")
    p.add_argument("--quick", action="store_true", help="a small config for smoke tests (about a minute)")
    p.add_argument("--fresh", action="store_true", help="ignore finished stages in --out and redo everything")
    p.add_argument("--seed", type=int, default=None, help="override the run seed (benchmark seed unchanged)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from stablesynth.pipeline import load_run_config, run_pipeline

    t0 = time.perf_counter()
    cfg = load_run_config(args.config, quick=args.quick)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    results = run_pipeline(cfg, args.out, reuse=not args.fresh)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; report: {args.out / 'report.md'}")
    return 0 if results else 1
