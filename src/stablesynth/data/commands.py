"""``stablesynth data ...`` subcommands: parse arguments, delegate to the data package."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stablesynth.data.benchmark import DeviceBenchmark
from stablesynth.data.benchmark_config import load_config
from stablesynth.data.device_grid import devices_grid_png
from stablesynth_device.argtypes import existing_file, int_at_least, output_dir


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="the embedded easy-VQA device benchmark")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    describe = sub.add_parser(
        "describe",
        help="per-device statistics table and a PNG of one scene as every device captures it",
    )
    describe.add_argument("--config", type=existing_file("--config"), default=None,
                          help="benchmark config (default: packaged)")
    describe.add_argument("--out", type=output_dir("--out"), default=Path("runs/data"),
                          help="output folder (default: runs/data)")
    describe.add_argument("--seed", type=int_at_least("--seed", 0), default=None, help="override the config's seed")
    describe.set_defaults(func=_describe)
    data.set_defaults(func=lambda _args: data.print_help() or 2)


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def format_table(stats: list[dict[str, Any]]) -> str:
    """The rows of :meth:`DeviceBenchmark.describe` as a fixed-width text table."""
    header = [
        "dev",
        "set",
        "gains R/G/B",
        "gamma",
        "contr",
        "bright",
        "noise",
        "blur",
        "drift",
        "skew (top 3)",
        "hist",
        "real",
    ]
    lines = []
    for s in stats:
        p = s["history_profile"]
        skew = ", ".join(f"{k} {v:.2f}" for k, v in s["skew_top"].items())
        lines.append(
            [
                str(s["device"]),
                "seen" if s["seen"] else "UNSEEN",
                "/".join(_fmt(p[k]) for k in ("gain_r", "gain_g", "gain_b")),
                _fmt(p["gamma"]),
                _fmt(p["contrast"]),
                f"{p['brightness']:+.2f}",
                f"{p['noise_std']:.3f}",
                _fmt(p["blur_sigma"]),
                f"{s['drift']:.3f}",
                skew,
                str(s["history_clips"]),
                str(s["realtime_clips"]),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    return "\n".join(out)


def check_out_folder(out: Path) -> None:
    """Raise ValueError naming the path when ``out`` cannot be made a folder (it, or a folder
    above it, is an existing file); checked before the benchmark is built."""
    for p in (out, *out.parents):
        if p.exists():
            if p.is_dir():
                return
            where = f"{out} is an existing file" if p == out else f"{out}: {p} is an existing file"
            raise ValueError(f"--out {where}, not a folder (data describe writes devices.png and devices.json there)")


def _describe(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    check_out_folder(args.out)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    bench = DeviceBenchmark.build(cfg)
    stats = bench.describe()
    print(
        f"easy-VQA device benchmark: seed {cfg.seed}, {cfg.n_devices} devices "
        f"({len(bench.unseen_devices)} unseen: {bench.unseen_devices}), "
        f"{len(bench.splits['history'])} history / {len(bench.splits['realtime'])} real-time clips, "
        f"{bench.num_classes} answers, skew over {cfg.skew_over}"
    )
    print("profiles are the history session's; drift = distance to the real-time session's profile")
    print(format_table(stats))
    args.out.mkdir(parents=True, exist_ok=True)
    png = devices_grid_png(bench, args.out / "devices.png")
    summary = {"config": cfg.to_dict(), "fingerprint": bench.fingerprint(), "devices": stats}
    (args.out / "devices.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {png} and {args.out / 'devices.json'}")
    return 0
