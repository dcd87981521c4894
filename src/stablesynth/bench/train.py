"""``stablesynth bench train``: stage-1 training and feature-extraction throughput at the paper's sizes.

The paper fine-tunes All-in-One-Ti on MSRVTT-QA at 897 s per epoch with 3 frames per
clip, batch 256, on one A100 (its Table 4). This benchmark runs the project's own
stage-1 step (:mod:`stablesynth.training.steps`: the encoder over each frame with the
question, the mean over D frames, the device head, cross-entropy, AdamW with the
polynomial schedule) and its feature extraction on synthetic clips of the right shape
(random frames, random token ids with padded questions, random labels, random weights),
and prints clips/s and seconds per epoch beside the paper's figure scaled to the same
number of clips.

Host→device copies of every batch are part of the timed step, as in training; decoding
video is not (the paper's figure includes its data loading). Warm-up steps (cuDNN
autotuning, allocator growth, compilation) are excluded.

It needs nothing but PyTorch: this module imports only torch, the standard library and
torch-only modules of the package (torch itself only once a benchmark runs, so the
command line builds fast), and ``python -m stablesynth.bench.train`` runs on a GPU
machine with only PyTorch installed (``PYTHONPATH=src``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from stablesynth.accelerator import add_device_argument
from stablesynth_device.argtypes import OneLineParser, int_at_least, output_file

if TYPE_CHECKING:
    import torch

#: The paper's Table 4: fine-tuning time per epoch on MSRVTT-QA, D = 3 frames, one A100, batch 256.
PAPER_EPOCH_S = 897.0
#: MSRVTT-QA's training questions (Xu et al. 2017: 158,581 train / 12,278 val / 72,821 test), one clip each.
MSRVTT_QA_TRAIN_CLIPS = 158_581
PAPER_BATCH = 256


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    """An encoder preset's architecture and the stage-1 shapes it is benchmarked at."""

    name: str
    #: ViTSpec keyword arguments (stablesynth.models.vit), the encoder's architecture.
    spec: Mapping[str, Any]
    frames: int
    num_classes: int
    batch_size: int
    eval_batch_size: int
    lr: float
    head_dropout: float = 0.5
    description: str = ""


# The architectures are those of ENCODERS["allinone-ti"] / ["allinone-cpu"] in models/encoder.py
# (a test keeps them equal), written out here so that this module needs only PyTorch.
PRESETS: dict[str, BenchPreset] = {
    "allinone-ti": BenchPreset(
        name="allinone-ti",
        spec=MappingProxyType(dict(image_size=224, patch_size=16, depth=12, num_heads=3, width=192, word_dim=192,
                                   max_text_len=40)),
        frames=3, num_classes=1501, batch_size=PAPER_BATCH, eval_batch_size=PAPER_BATCH, lr=2e-5,
        description="the paper's All-in-One-Ti: 224 px, 12 layers, 40 tokens, K = 1501, D = 3"),
    "allinone-cpu": BenchPreset(
        name="allinone-cpu",
        spec=MappingProxyType(dict(image_size=32, patch_size=8, depth=4, num_heads=3, width=192, mlp_ratio=4.0,
                                   word_dim=384, max_text_len=16, freeze_word_embeddings=True)),
        frames=3, num_classes=1501, batch_size=64, eval_batch_size=128, lr=1e-3,
        description="the demo's CPU encoder: 32 px, 4 layers, 16 tokens, K = 1501, D = 3"),
}


def synthetic_batch(preset: BenchPreset, batch_size: int, generator: torch.Generator,
                    pin: bool = False) -> dict[str, torch.Tensor]:
    """One stage-1 batch of the preset's shapes: normalised frames, padded questions, labels."""
    import torch

    from stablesynth.models.vit import ViTSpec

    spec = ViTSpec(**preset.spec)
    B, D, L = batch_size, preset.frames, spec.max_text_len
    frames = torch.randn(B, D, spec.in_chans, spec.image_size, spec.image_size, generator=generator)
    input_ids = torch.randint(1000, spec.vocab_size, (B, L), generator=generator)
    # Questions of 6..L tokens, the rest padding (the encoder then masks the padded keys, as in training).
    lengths = torch.randint(min(6, L), L + 1, (B,), generator=generator)
    attention_mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    batch = {
        "frames": frames,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "label": torch.randint(0, preset.num_classes, (B,), generator=generator),
        "global_index": torch.arange(D).repeat(B, 1),
    }
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _timed(step: Callable[[int], None], steps: int, warmup: int, device: torch.device) -> float:
    from stablesynth.accelerator import synchronize

    for i in range(warmup):
        step(i)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    synchronize(device)
    return time.perf_counter() - t0


def run_train_benchmark(preset: str = "allinone-cpu", device: str | torch.device = "auto", *,
                        batch_size: int | None = None, eval_batch_size: int | None = None, steps: int = 5,
                        warmup: int = 2, amp: bool = True, compile: bool = False, seed: int = 0,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time ``steps`` stage-1 steps and ``steps`` feature-extraction batches after ``warmup`` of each.

    Returns a JSON-ready dict: per phase clips/s, seconds per MSRVTT-QA epoch, and (stage
    1) the paper's figures and the speed-up over them.
    """
    import torch

    from stablesynth.accelerator import (
        autocast,
        configure_backends,
        describe,
        precision_name,
        resolve_device,
        to_device,
    )
    from stablesynth.models.global_model import GlobalModel, encode_frames
    from stablesynth.models.vit import MultimodalEncoder, ViTSpec
    from stablesynth.training.steps import forward_loss, make_optimizer, make_scheduler, optimizer_step

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    p = PRESETS[preset]
    dev = resolve_device(device)
    configure_backends(dev)
    on_gpu = dev.type == "cuda"
    B = batch_size or p.batch_size
    Be = eval_batch_size or p.eval_batch_size
    if B < 1 or Be < 1:
        raise ValueError("batch sizes must be >= 1")
    say = log or (lambda _msg: None)

    torch.manual_seed(seed)
    model = GlobalModel(MultimodalEncoder(ViTSpec(**p.spec)), p.num_classes, dropout=p.head_dropout).to(dev)
    net: Any = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(seed)
    # Two distinct batches in (pinned) host memory, copied to the device every step as training does.
    batches = [synthetic_batch(p, B, gen, pin=on_gpu) for _ in range(2)]
    opt = make_optimizer(model, p.lr, 0.01, dev)
    sched = make_scheduler(opt, total=warmup + steps, warmup=max(1, (warmup + steps) // 10))
    model.train()

    def train_step(i: int) -> None:
        batch = to_device(batches[i % 2], dev, non_blocking=True)
        _, loss = forward_loss(net, batch, dev, amp)
        optimizer_step(loss, model, opt, sched, grad_clip=1.0)

    say(f"bench train: {p.name} on {describe(dev)}: {warmup} warm-up + {steps} timed stage-1 steps of {B} clips")
    train_s = _timed(train_step, steps, warmup, dev)

    encoder = model.encoder.eval()
    enc: Any = torch.compile(encoder) if compile else encoder
    eval_batches = [synthetic_batch(p, Be, gen, pin=on_gpu) for _ in range(2)]

    def extract_step(i: int) -> None:
        b = to_device({k: eval_batches[i % 2][k] for k in ("frames", "input_ids", "attention_mask")}, dev,
                      non_blocking=True)
        with torch.inference_mode(), autocast(dev, amp):
            feats = encode_frames(enc, b["frames"], b["input_ids"], b["attention_mask"])
            # As extract_features does: check the features, keep an fp32 copy on the host.
            if not bool(torch.isfinite(feats).all()):
                raise FloatingPointError("the encoder produced non-finite features")
            feats.float().cpu()

    say(f"bench train: {warmup} warm-up + {steps} timed feature-extraction batches of {Be} clips")
    extract_s = _timed(extract_step, steps, warmup, dev)

    def phase(seconds: float, clips: int) -> dict[str, float]:
        rate = clips / seconds
        return {"clips": clips, "seconds": seconds, "clips_per_s": rate,
                "epoch_s": MSRVTT_QA_TRAIN_CLIPS / rate}

    stage1 = phase(train_s, B * steps)
    paper_rate = MSRVTT_QA_TRAIN_CLIPS / PAPER_EPOCH_S
    stage1["paper_epoch_s"] = PAPER_EPOCH_S
    stage1["paper_clips_per_s"] = paper_rate
    stage1["paper_seconds_same_clips"] = stage1["clips"] / paper_rate
    stage1["speedup_vs_paper"] = stage1["clips_per_s"] / paper_rate
    spec = dataclasses.asdict(ViTSpec(**p.spec))
    return {
        "preset": p.name,
        "description": p.description,
        "device": describe(dev),
        "device_type": dev.type,
        "precision": precision_name(dev, amp),
        "compiled": compile,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "threads": torch.get_num_threads(),
        "batch_size": B,
        "eval_batch_size": Be,
        "frames": p.frames,
        "num_classes": p.num_classes,
        "encoder": spec,
        "parameters": sum(t.numel() for t in model.parameters()),
        "steps": steps,
        "warmup": warmup,
        "epoch_clips": MSRVTT_QA_TRAIN_CLIPS,
        "stage1": stage1,
        "features": phase(extract_s, Be * steps),
    }


def format_table(r: dict[str, Any]) -> str:
    s1, fx = r["stage1"], r["features"]
    lines = [
        f"bench train — {r['preset']} ({r['description']})",
        f"device {r['device']}, {r['precision']}{', torch.compile' if r['compiled'] else ''}, torch {r['torch']}; "
        f"{r['steps']} timed steps after {r['warmup']} warm-up; batches of {r['batch_size']} clips × {r['frames']} "
        f"frames (extraction: {r['eval_batch_size']} clips)",
        f"epoch = MSRVTT-QA's {r['epoch_clips']:,} training clips; paper: {s1['paper_epoch_s']:.0f} s/epoch "
        f"on one A100 = {s1['paper_clips_per_s']:.1f} clips/s",
        "",
        f"{'phase':<22}{'clips':>8}{'seconds':>10}{'clips/s':>11}{'s/epoch':>11}"
        f"{'paper s (same clips)':>22}{'vs paper':>10}",
        f"{'stage 1 (train step)':<22}{s1['clips']:>8}{s1['seconds']:>10.2f}{s1['clips_per_s']:>11.1f}"
        f"{s1['epoch_s']:>11.0f}{s1['paper_seconds_same_clips']:>22.2f}{s1['speedup_vs_paper']:>9.2f}x",
        f"{'feature extraction':<22}{fx['clips']:>8}{fx['seconds']:>10.2f}{fx['clips_per_s']:>11.1f}"
        f"{fx['epoch_s']:>11.0f}{'—':>22}{'—':>10}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="allinone-ti",
                        help="encoder preset and its stage-1 shapes (default allinone-ti, the paper's)")
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=None,
                        help="stage-1 clips per step (default: preset's)")
    parser.add_argument("--eval-batch-size", type=int_at_least("--eval-batch-size", 1), default=None,
                        help="clips per feature-extraction batch (default: preset's)")
    parser.add_argument("--steps", type=int_at_least("--steps", 1), default=5, help="timed steps per phase (default 5)")
    parser.add_argument("--warmup", type=int_at_least("--warmup", 0), default=2,
                        help="untimed warm-up steps per phase (default 2)")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too (default: bf16 autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first (warm-up pays it)")
    parser.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    parser.add_argument("--json", type=output_file("--json"), default=None,
                        help="also write the figures to this JSON file")


def run_from_args(args: argparse.Namespace) -> int:
    result = run_train_benchmark(args.preset, args.device, batch_size=args.batch_size,
                                 eval_batch_size=args.eval_batch_size, steps=args.steps, warmup=args.warmup,
                                 amp=not args.no_amp, compile=args.compile, seed=args.seed,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m stablesynth.bench.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:
        print(f"bench train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
