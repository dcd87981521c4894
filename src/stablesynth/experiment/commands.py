"""`stablesynth demo`, `train` and `eval`: the main job, on the embedded benchmark or a real dataset.

Open-ended QA (msrvtt-qa, msvd-qa, tgif-frameqa), multiple choice (msrvtt-mc) and
retrieval (msrvtt-ret) on the paper's datasets; see :mod:`stablesynth.experiment.realdata.run`.
Under torchrun (``torchrun --nproc_per_node 2 -m stablesynth.cli train ...``) stage 1
runs with DistributedDataParallel and the feature cache is split across the ranks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stablesynth.accelerator import add_device_argument
from stablesynth_device.argtypes import existing_dir, existing_file, int_at_least, output_dir


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
    p.add_argument("--out", type=output_dir("--out"), default=Path("runs/demo"),
                   help="output folder (default: runs/demo)")
    p.add_argument("--config", type=Path, default=None,
                   help="a run config (YAML/TOML/JSON file) or a packaged one by name: demo (default: harsh "
                        "cameras, 10 seen devices, mild usage skew), mild (the former default: 30 mild cameras), "
                        "harsh (the default's cameras, strong usage skew), scratch (no stage 0), camera (mild, stage "
                        "0 sees camera-like captures), aux (mild, stage 1 also learns each scene's colour and shape), "
                        "quick")
    p.add_argument("--quick", action="store_true", help="a small config for smoke tests (about a minute)")
    p.add_argument("--fresh", action="store_true", help="ignore finished stages in --out and redo everything")
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=None,
                   help="override the run seed (benchmark seed unchanged)")
    p.add_argument("--seeds", type=int_at_least("--seeds", 1), default=1,
                   help="run everything (QA and --task's caption tasks) over N benchmark seeds, each a new draw of "
                        "devices, casts and clips and a new training seed (default 1: one draw); seed k>0 goes to "
                        "OUT/seeds/k and seeds.json gives every figure as its mean and min-max over the seeds")
    p.add_argument("--task", choices=("qa", "mc", "ret", "all"), default=None,
                   help="what to measure: open-ended QA (qa, the default), multiple choice (mc) or retrieval (ret) "
                        "on the clips' captions, or all three in one report; mc and ret share one matching model "
                        "fine-tuned from the QA stage-1 model (default: the config's tasks)")
    add_device_argument(p)
    p.set_defaults(func=_demo)
    from stablesynth.experiment.realdata.config import SUPPORTED_PRESETS

    t = sub.add_parser(
        "train",
        help="train every method on a real video dataset (MSRVTT-QA, MSVD-QA, TGIF FrameQA, MSRVTT-MC, "
             "MSRVTT retrieval)",
        description=(
            "Reads the dataset's published annotation files under --data-root, decodes its videos, trains "
            "stage 1 (encoder + head), caches per-frame features, trains every method in stage 2 and evaluates "
            "each per device on the test split; writes results.json and report.md to --out. Hyper-parameters "
            "are the paper's (from the preset) unless --config overrides them. Finished stages in --out are "
            "reused. Run under torchrun for multi-process stage 1 and feature extraction. msrvtt-mc and msrvtt-ret "
            "score (clip, text) pairs with one logit; both train on MSRVTT retrieval's (video, caption) pairs "
            "with sampled negative captions (msrvtt-mc: or --train-from a file of MC items)."
        ),
    )
    t.add_argument("--preset", required=True, choices=SUPPORTED_PRESETS, help="dataset preset")
    _data_arguments(t, required=True)
    t.add_argument("--out", type=output_dir("--out"), required=True, help="output folder (checkpoints, caches, report)")
    t.add_argument("--config", type=existing_file("--config"), default=None,
                   help="YAML/TOML/JSON overrides of the preset's settings")
    t.add_argument("--seed", type=int_at_least("--seed", 0), default=None, help="override the run seed")
    t.add_argument("--train-from", type=existing_file("--train-from"), default=None,
                   help="msrvtt-mc only: train on this JSON-lines file of MC items (clip_name, options, answer) "
                        "instead of MSRVTT retrieval's train pairs")
    add_device_argument(t)
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval",
        help="evaluate a finished `stablesynth train` run again from its checkpoints",
        description=(
            "Loads the stage-1 and method checkpoints in --checkpoint-dir, encodes the test clips again from "
            "the videos and writes results.json and report.md (default: CHECKPOINT_DIR/eval)."
        ),
    )
    e.add_argument("--checkpoint-dir", type=existing_dir("--checkpoint-dir"), required=True,
                   help="the --out folder of `stablesynth train`")
    e.add_argument("--out", type=output_dir("--out"), default=None, help="output folder (default: CHECKPOINT_DIR/eval)")
    _data_arguments(e, required=False)
    add_device_argument(e)
    e.set_defaults(func=_eval)


def _data_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data-root", type=existing_dir("--data-root"), required=required,
                   help="the dataset folder (annotations and media)" + ("" if required else ", if it moved"))
    p.add_argument("--frames-dir", type=existing_dir("--frames-dir"), default=None,
                   help="pre-extracted frames: one folder of images per clip, FRAMES_DIR/<clip name>/")


def _demo(args: argparse.Namespace) -> int:
    from stablesynth.experiment.demo import load_run_config
    from stablesynth.experiment.seeds import run_seeds

    t0 = time.perf_counter()
    cfg = load_run_config(args.config, quick=args.quick)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    if args.task is not None:
        cfg = cfg.replace(tasks=["qa", "mc", "ret"] if args.task == "all" else [args.task])
    results = run_seeds(cfg, args.out, args.seeds, reuse=not args.fresh, device=args.device)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; report: {args.out / 'report.md'}")
    return 0 if results else 1


def _train(args: argparse.Namespace) -> int:
    from stablesynth.experiment.realdata.config import load_realdata_config
    from stablesynth.experiment.realdata.run import train_realdata
    from stablesynth.training.distributed import cleanup, init_distributed

    t0 = time.perf_counter()
    cfg = load_realdata_config(args.preset, args.config, data_root=str(args.data_root),
                               frames_dir=str(args.frames_dir) if args.frames_dir else None, seed=args.seed,
                               train_from=str(args.train_from) if args.train_from else None)
    ctx = init_distributed()
    try:
        train_realdata(cfg, args.out, dist=ctx, device=args.device)
    finally:
        cleanup(ctx)
    if ctx.is_main:
        print(f"train finished in {time.perf_counter() - t0:.1f} s; report: {args.out / 'report.md'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from stablesynth.experiment.realdata.run import eval_realdata

    out = args.out or args.checkpoint_dir / "eval"
    eval_realdata(args.checkpoint_dir, out, device=args.device,
                  data_root=str(args.data_root) if args.data_root else None,
                  frames_dir=str(args.frames_dir) if args.frames_dir else None)
    print(f"eval finished; report: {out / 'report.md'}")
    return 0
