"""A demo run's parts the device side is built from: its stage-1 encoder, its benchmark, its clips.

``stablesynth device export`` reads the run's stage-1 encoder and benchmark from here;
``stablesynth device clip`` renders one real-time clip of the embedded easy-VQA benchmark as the
device captured it and writes it as image frames, so the demo can be reproduced on the device
path end to end (``stablesynth-device predict --frames DIR``).

The benchmark is rebuilt from the run's own config (``results.json``) when it has one, else
from the packaged configs; whichever is used must have the fingerprint the stage-1 checkpoint
was trained on, so the device never encodes a clip of a different benchmark than the run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class RunDirError(ValueError):
    """The run directory is missing or does not hold what the device needs."""


def _candidate_configs(run_dir: Path) -> list[tuple[str, Any]]:
    from stablesynth.data.benchmark_config import BenchmarkConfig, load_config

    out: list[tuple[str, Any]] = []
    results = run_dir / "results.json"
    if results.is_file():
        try:
            bench = json.loads(results.read_text()).get("config", {}).get("benchmark")
            if isinstance(bench, dict):
                out.append((str(results), BenchmarkConfig.from_dict(bench)))
        except (ValueError, TypeError, AttributeError):
            pass  # an unreadable results.json is not fatal: the packaged configs may still match
    out.append(("the packaged benchmark config", load_config()))
    return out


def load_benchmark(run_dir: Path, fingerprint: str | None) -> Any:
    """The run's DeviceBenchmark: the first candidate config whose fingerprint is ``fingerprint``."""
    from stablesynth.data.benchmark import DeviceBenchmark

    tried: list[str] = []
    seen: set[str] = set()
    data = None
    for where, cfg in _candidate_configs(run_dir):
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        bench = DeviceBenchmark.build(cfg, data)
        data = bench.data  # easy-VQA is loaded once
        if fingerprint is None or bench.fingerprint() == fingerprint:
            return bench
        tried.append(f"{where} ({bench.fingerprint()})")
    raise RunDirError(f"stage 1 in {run_dir} was trained on benchmark {fingerprint}, which none of "
                      f"{'; '.join(tried)} rebuilds; run `stablesynth demo --out {run_dir}` again")


def load_encoder(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The stage-1 model (encoder + head) of ``run_dir`` in eval mode, and its manifest."""
    from stablesynth.checkpoint import CheckpointError, load_checkpoint
    from stablesynth.models.encoder import create_model
    from stablesynth.models.global_model import GlobalModel

    stage1 = run_dir / "stage1"
    try:
        tensors, manifest = load_checkpoint(stage1)
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        raise RunDirError(f"{stage1} is not a usable stage-1 checkpoint ({exc}); "
                          f"run `stablesynth demo --out {run_dir}` first") from None
    for key in ("encoder", "num_classes"):
        if key not in manifest:
            raise RunDirError(f"{stage1}/manifest.json lacks {key!r}; it is not a stage-1 checkpoint")
    model = GlobalModel(create_model(manifest["encoder"], **(manifest.get("encoder_overrides") or {})),
                        int(manifest["num_classes"]))
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunDirError(f"{stage1} does not fit encoder {manifest['encoder']!r}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), manifest


def write_clip(run_dir: str | Path, device: int, clip: int, out: str | Path) -> dict[str, Any]:
    """Render clip ``clip`` (0-based) of device ``device``'s real-time session into ``out`` as PNG frames.

    Writes ``frame_00.png`` … and ``clip.json`` (question, true answer, the frames the benchmark
    averages into F_g and the frame it uploads) and returns what ``clip.json`` holds. PNG keeps
    8 bits per channel, so the frames differ from the benchmark's float frames by up to 1/510.
    """
    from PIL import Image

    from stablesynth.files import atomic_write_text

    run = Path(run_dir)
    if not (run / "stage1" / "manifest.json").is_file():
        raise RunDirError(f"{run} has no stage-1 checkpoint (stage1/manifest.json); "
                          f"run `stablesynth demo --out {run}` first (or pass --run-dir)")
    _, manifest = load_encoder(run)
    bench = load_benchmark(run, manifest.get("benchmark"))
    ids = [d.id for d in bench.devices]
    if device not in ids:
        raise ValueError(f"--device {device}: the benchmark has devices {min(ids)}..{max(ids)}")
    rows = bench.rows("realtime", [device])
    if not 0 <= clip < len(rows):
        raise ValueError(f"--clip {clip}: device {device} has {len(rows)} real-time clips (0..{len(rows) - 1})")
    row = rows[clip : clip + 1]
    frames = bench.render("realtime", row)[0]  # [N_f, 3, S, S] in [0, 1]
    table = bench.samples("realtime", [device])
    label = int(table.label[clip])
    question = bench.data.split("test").questions[int(bench.splits["realtime"].question[row[0]])]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, px in enumerate(pixels):
        Image.fromarray(px, "RGB").save(out / f"frame_{i:02d}.png")
    info = {"question": question, "answers": list(bench.answer_names),
            "true_answer": bench.answer_names[label] if label >= 0 else None,
            "device": device, "device_seen": device in bench.seen_devices, "clip": clip,
            "upload_index": int(table.upload_index[clip]), "global_index": [int(i) for i in table.global_index[clip]]}
    atomic_write_text(out / "clip.json", json.dumps(info, indent=2) + "\n")
    return info
