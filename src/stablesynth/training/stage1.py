"""Stage 1: train the multimodal encoder with a global task head (the Fine-tuning baseline).

The model is Eq. 4 with static parameters: F_g = mean of the encoder's features of
the D sampled frames, then the device head (static MLP + a plain 96 → K layer).
Training is resumable: the state after every epoch is a checkpoint (model and
AdamW moments in safetensors, epoch and scheduler position in the manifest).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stablesynth.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stablesynth.config import Config, require
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.distributed import SINGLE, DistContext


@dataclass
class Stage1Config(Config):
    """Stage-1 optimisation (paper §4.3: AdamW, polynomial decay, lr 2e-5, 10 epochs).

    The paper fine-tunes a pretrained All-in-One; the CPU preset's vision blocks start
    from scratch, so its default config raises the learning rate (see configs/).
    """

    epochs: int = 10
    lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 64
    warmup_ratio: float = 0.1
    power: float = 1.0
    grad_clip: float = 1.0
    head_dropout: float = 0.5
    max_steps_per_epoch: int = 0

    def validate(self) -> None:
        require(self.epochs >= 0, "epochs", "must be >= 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        require(0 <= self.head_dropout < 1, "head_dropout", "must be in [0, 1)")
        require(self.max_steps_per_epoch >= 0, "max_steps_per_epoch", "must be >= 0 (0 = no cap)")


def polynomial_decay(step: int, total: int, warmup: int, power: float = 1.0) -> float:
    """Linear warm-up then polynomial decay to 0 (the All-in-One schedule)."""
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (1.0 - progress) ** power


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"optim.{pid}.{key}"] = value.detach().clone().reshape(value.shape)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def train_stage1(
    model: GlobalModel,
    loader_factory: Any,
    cfg: Stage1Config,
    ckpt_dir: Path,
    seed: int,
    manifest_extra: Mapping[str, Any] | None = None,
    log: Any = print,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs``; resume from ``ckpt_dir`` when it holds a partial run.

    ``loader_factory(epoch)`` returns that epoch's batches (reshuffled by a seed
    derived from ``seed`` and the epoch, so a resumed run sees the same data).
    Returns the training history (per-epoch loss, accuracy, seconds).

    Under torchrun pass ``dist`` (:func:`~stablesynth.training.distributed.init_distributed`):
    the model runs under DistributedDataParallel, ``loader_factory`` must yield this
    rank's shard (every rank the same number of batches), epoch metrics are summed over
    ranks, and only rank 0 writes the checkpoint and the log.
    """
    ctx = dist or SINGLE
    log = ctx.log(log)
    net = ctx.wrap(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embed" in name or "token" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    steps_per_epoch = len(loader_factory(0))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: polynomial_decay(s, total, warmup, cfg.power))

    history: list[dict[str, float]] = []
    start_epoch = 0
    if (ckpt_dir / "manifest.json").exists():
        try:
            tensors, manifest = load_checkpoint(ckpt_dir, expect_kind="stage1")
        except CheckpointError:
            raise
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(opt, tensors)
        start_epoch = int(manifest["epoch"])
        history = list(manifest.get("history", []))
        with warnings.catch_warnings():
            # Replaying the schedule before any optimizer step is intended here.
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_epoch * steps_per_epoch):
                sched.step()
        if start_epoch >= cfg.epochs:
            log(f"stage 1: reusing finished checkpoint {ckpt_dir} ({start_epoch} epochs)")
            return {"history": history, "resumed_from": start_epoch, "trained_epochs": 0}
        log(f"stage 1: resuming at epoch {start_epoch + 1}/{cfg.epochs}")

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(seed * 1000 + epoch)
        model.train()
        t0 = time.perf_counter()
        total_loss, correct, count = 0.0, 0, 0
        batches: Iterable = loader_factory(epoch)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"stage 1 epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=True if not ctx.is_main else None)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            logits = net(batch)
            loss = nn.functional.cross_entropy(logits, batch["label"], ignore_index=-100)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage 1: loss became {float(loss)} at epoch {epoch + 1} step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            valid = batch["label"] != -100
            n = int(valid.sum())
            total_loss += loss.item() * n
            correct += int((logits.argmax(-1) == batch["label"])[valid].sum())
            count += n
            bar.set_postfix(loss=f"{total_loss / max(count, 1):.3f}", acc=f"{correct / max(count, 1):.3f}")
        bar.close()
        sums = ctx.all_reduce({"loss": total_loss, "correct": correct, "count": count})
        total_loss, correct, count = sums["loss"], int(sums["correct"]), int(sums["count"])
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / max(count, 1),
            "train_accuracy": correct / max(count, 1),
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        log(f"stage 1 epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
            f"train acc {record['train_accuracy']:.3f} ({record['seconds']:.1f} s)")
        if ctx.is_main:
            tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
            tensors.update(_optimizer_tensors(opt))
            save_checkpoint(ckpt_dir, tensors, {
                "kind": "stage1", "epoch": epoch + 1, "history": history, "config": cfg.to_dict(),
                **(dict(manifest_extra) if manifest_extra else {}),
            })
        # Other ranks may read the checkpoint next (resume, feature extraction): wait for it.
        ctx.barrier()
    return {"history": history, "resumed_from": start_epoch, "trained_epochs": cfg.epochs - start_epoch}
