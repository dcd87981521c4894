"""A real clip for the device: one real-time clip of the embedded easy-VQA benchmark, encoded.

``stablesynth device predict --clip I --device N --run-dir RUN`` runs what a device would:
render clip ``I`` of device ``N``'s real-time session, encode every frame with the run's
stage-1 encoder (the multimodal encoder the device ships with), upload the clip's upload
frame, and predict on F_g, the mean of its ``global_index`` frames.

The benchmark is rebuilt from the run's own config (``results.json``) when it has one, else
from the packaged configs; whichever is used must have the fingerprint the stage-1 checkpoint
was trained on, so the device never encodes a clip of a different benchmark than the run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class RunDirError(ValueError):
    """The run directory is missing or does not hold what the device needs."""


@dataclass
class ClipFeatures:
    """One clip's per-frame features and what is known about it."""

    frames: torch.Tensor  # [N_f, 192] per-frame features F_m
    upload_index: int
    global_index: list[int]
    label: int  # -100 when the answer is outside the vocabulary
    answers: list[str]
    question: str
    device: int
    clip: int
    seen: bool

    @property
    def upload(self) -> torch.Tensor:
        """The one frame the device uploads (192 floats)."""
        return self.frames[self.upload_index]

    @property
    def f_g(self) -> torch.Tensor:
        """F_g: the mean of the clip's ``global_index`` frames (192 floats)."""
        return self.frames[self.global_index].mean(0)

    @property
    def true_answer(self) -> str | None:
        return self.answers[self.label] if 0 <= self.label < len(self.answers) else None


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


def clip_features(run_dir: str | Path, device: int, clip: int) -> ClipFeatures:
    """Render and encode clip ``clip`` (0-based) of device ``device``'s real-time session."""
    from stablesynth.data.clip_loader import make_loader
    from stablesynth.models.global_model import encode_frames

    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory {run} does not exist; run `stablesynth demo --out {run}` first "
                          "(or pass --run-dir)")
    if not (run / "stage1" / "manifest.json").is_file():
        raise RunDirError(f"{run} has no stage-1 checkpoint (stage1/manifest.json); "
                          f"run `stablesynth demo --out {run}` first")
    model, manifest = load_encoder(run)
    bench = load_benchmark(run, manifest.get("benchmark"))
    ids = [d.id for d in bench.devices]
    if device not in ids:
        raise ValueError(f"--device {device}: the benchmark has devices {min(ids)}..{max(ids)}")
    loader = make_loader(bench, "realtime", [device], batch_size=1)
    ds = loader.dataset
    if not 0 <= clip < len(ds):
        raise ValueError(f"--clip {clip}: device {device} has {len(ds)} real-time clips (0..{len(ds) - 1})")
    batch = loader.collate_fn([ds[clip]])
    with torch.inference_mode():
        frames = encode_frames(model.encoder, batch["frames"], batch["input_ids"], batch["attention_mask"])[0]
    table = bench.splits["realtime"]
    row = ds[clip]
    question = bench.data.split("test").questions[int(table.question[row])]
    return ClipFeatures(frames=frames.clone(), upload_index=int(batch["upload_index"][0]),
                        global_index=[int(i) for i in batch["global_index"][0]], label=int(batch["label"][0]),
                        answers=list(bench.answer_names), question=question, device=device, clip=clip,
                        seen=device in bench.seen_devices)
