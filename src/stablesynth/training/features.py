"""The feature cache: per-frame features of a frozen encoder, in safetensors shards.

Stage 2 freezes the encoder, so every method trains on these cached features
(DESIGN §3). Shards are written one by one with a manifest that records the
encoder's fingerprint; an interrupted extraction resumes at the first missing
shard, and a cache made by another encoder or from other clips is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stablesynth.accelerator import autocast, configure_backends, precision_name, to_device
from stablesynth.data.batch import FeatureBatch
from stablesynth.models.global_model import encode_frames
from stablesynth.training.distributed import SINGLE, DistContext, training_device

ROW_KEYS = ("label", "device", "question_type", "upload_index", "global_index", "sample_id")
CACHE_FORMAT = 1


class FeatureCacheError(ValueError):
    """A cache that is incomplete, corrupt, or made by another encoder / other clips."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the module's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@torch.inference_mode()
def extract_features(
    encoder: torch.nn.Module,
    batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
    n_batches: int,
    out_dir: Path,
    key: Mapping[str, Any],
    shard_batches: int = 8,
    desc: str = "features",
    dist: DistContext | None = None,
    device: torch.device | str | None = None,
) -> Path:
    """Encode every frame of every clip; write shards of ``shard_batches`` batches each.

    ``key`` describes what is cached (encoder fingerprint, benchmark seed, split,
    devices, …); an existing cache with the same key is resumed or reused, one with
    another key is an error rather than silently mixed.

    When ``batches()`` returns a :class:`~collections.abc.Sequence`, only the batches of
    missing shards are fetched, so resuming (or another rank's shards) costs no
    decoding. Under torchrun (``dist``) shard s is written by rank ``s % world_size``;
    every rank returns once the whole cache is complete.

    ``device`` (default CPU; this rank's GPU under NCCL) is where ``encoder`` runs; it is
    moved there. On CUDA the encoder runs under bf16 autocast and the cache's key records
    ``"precision": "bfloat16"``, so fp32 (CPU) and bf16 shards never mix; features are
    stored as fp32 on CPU either way.
    """
    ctx = dist or SINGLE
    dev = training_device(device, ctx)
    configure_backends(dev)
    if dev.type != "cpu":
        key = {**key, "precision": precision_name(dev)}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    n_shards = (n_batches + shard_batches - 1) // shard_batches
    manifest = {"format": CACHE_FORMAT, "key": dict(key), "n_batches": n_batches,
                "shard_batches": shard_batches, "n_shards": n_shards, "complete": False}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("key") != manifest["key"] or old.get("n_shards") != n_shards:
            raise FeatureCacheError(
                f"feature cache {out_dir} was made for other inputs ({old.get('key')}); "
                "delete it or choose another --out"
            )
        if old.get("complete"):
            return out_dir
    # Every rank has read the old manifest before rank 0 replaces it.
    ctx.barrier()
    if ctx.is_main:
        _atomic_json(manifest_path, manifest)
    encoder.to(dev)
    encoder.eval()
    done = {int(p.stem.split("-")[1]) for p in out_dir.glob("shard-*.safetensors")}
    mine = {s for s in range(n_shards) if s % ctx.world_size == ctx.rank and s not in done}
    source = batches()
    if isinstance(source, Sequence):
        wanted = [i for i in range(n_batches) if i // shard_batches in mine]
        indexed: Iterable[tuple[int, Mapping[str, torch.Tensor]]] = ((i, source[i]) for i in wanted)
    else:
        indexed = enumerate(source)
    pending: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=n_batches, desc=desc, leave=False, dynamic_ncols=True,
               disable=True if not ctx.is_main else None)
    for i, batch in indexed:
        shard = i // shard_batches
        if shard not in mine:
            bar.update(1)
            continue
        inputs = {k: batch[k] for k in ("frames", "input_ids", "attention_mask")}
        if dev.type != "cpu":
            inputs = to_device(inputs, dev, non_blocking=True)
        with autocast(dev):
            feats = encode_frames(encoder, inputs["frames"], inputs["input_ids"], inputs["attention_mask"])
        if not torch.isfinite(feats).all():
            raise FeatureCacheError(f"encoder produced non-finite features in batch {i}")
        pending.setdefault("frames", []).append(feats.float().cpu())
        for k in ROW_KEYS:
            pending.setdefault(k, []).append(batch[k].long())
        bar.update(1)
        if (i + 1) % shard_batches == 0 or i + 1 == n_batches:
            path = out_dir / f"shard-{shard:05d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file({k: torch.cat(v).contiguous() for k, v in pending.items()}, str(tmp))
            os.replace(tmp, path)
            pending = {}
    bar.close()
    ctx.barrier()
    if ctx.is_main:
        missing = [s for s in range(n_shards) if not (out_dir / f"shard-{s:05d}.safetensors").exists()]
        if missing:
            raise FeatureCacheError(f"feature cache {out_dir}: shards {missing} were not written "
                                    f"(the batches ran out after fewer than {n_batches})")
        manifest["complete"] = True
        _atomic_json(manifest_path, manifest)
    ctx.barrier()
    return out_dir


def load_features(cache_dir: Path) -> dict[str, torch.Tensor]:
    """All rows of a complete cache, concatenated in clip order."""
    manifest_path = cache_dir / "manifest.json"
    if not manifest_path.exists():
        raise FeatureCacheError(f"no feature cache at {cache_dir}")
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        raise FeatureCacheError(f"feature cache {cache_dir} is incomplete; run the extraction again to resume")
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in range(manifest["n_shards"]):
        path = cache_dir / f"shard-{shard:05d}.safetensors"
        if not path.exists():
            raise FeatureCacheError(f"feature cache {cache_dir} is missing {path.name}")
        try:
            rows = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise FeatureCacheError(f"feature cache shard {path} is corrupt: {exc}") from exc
        for k, v in rows.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def cached_features(encoder: torch.nn.Module, batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
                    n_batches: int, cache_dir: Path, key: Mapping[str, Any], desc: str,
                    log: Callable[[str], None], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The rows of :func:`extract_features` (single process), loaded; the encoder is back on the CPU after.

    A cache that is stale (another encoder, other rows) or damaged is worthless, so it is
    deleted and extracted once more."""
    def extract() -> dict[str, torch.Tensor]:
        return load_features(extract_features(encoder, batches, n_batches, cache_dir, key, desc=desc, device=device))

    try:
        return extract()
    except FeatureCacheError as exc:
        log(f"rebuilding {cache_dir}: {str(exc).split(';')[0]}")
        shutil.rmtree(cache_dir)
        return extract()
    finally:
        encoder.cpu()


def to_feature_batch(rows: Mapping[str, torch.Tensor], category: str = "answer") -> FeatureBatch:
    """Rows of a cache as a :class:`FeatureBatch`, with categories from ``category``."""
    source = {"answer": "label", "question_type": "question_type", "device": "device"}
    if category not in source:
        raise ValueError(f"unknown category source {category!r} (known: {', '.join(source)})")
    return FeatureBatch(
        frames=rows["frames"],
        label=rows["label"],
        category=rows[source[category]].clone(),
        device=rows["device"],
        upload_index=rows["upload_index"],
        global_index=rows["global_index"],
    )
