"""Stage 1: train the multimodal encoder with a global task head (the Fine-tuning baseline).

The model is Eq. 4 with static parameters: F_g = mean of the encoder's features of
the D sampled frames, then the device head (static MLP + a plain 96 → K layer).
Training is resumable: the state after every epoch is a checkpoint (model and
AdamW moments in safetensors, epoch and scheduler position in the manifest).

It runs on the device it is given (CPU by default; bf16 autocast and fused AdamW on
CUDA, see :mod:`stablesynth.training.steps`). Checkpoints are written from CPU copies,
so a run trained on a GPU resumes, evaluates or serves on a CPU and vice versa.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from stablesynth.accelerator import autocast, configure_backends, to_device
from stablesynth.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stablesynth.config import Config
from stablesynth.data.easyvqa import COLORS, IGNORE, SHAPES
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.distributed import SINGLE, DistContext, training_device
from stablesynth.training.steps import forward_loss, make_optimizer, make_scheduler, optimizer_step
from stablesynth.training.steps import polynomial_decay as polynomial_decay


class Stage1Config(Config):
    """Stage-1 optimisation (paper §4.3: AdamW, polynomial decay, lr 2e-5, 10 epochs).

    The paper fine-tunes a pretrained All-in-One; the CPU preset's vision blocks start
    from scratch, so its default config raises the learning rate (see configs/).
    """

    epochs: int = Field(10, ge=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(64, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    power: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    head_dropout: float = Field(0.5, ge=0, lt=1)
    #: Cap on the steps of one epoch (0 = no cap).
    max_steps_per_epoch: int = Field(0, ge=0)
    #: Frames of each clip's D global frames that a training step encodes (0 = all D), drawn
    #: anew every step; F_g is still the mean of all D at evaluation. Encoding is most of the
    #: step's cost, so 1 of 3 trains about three times faster.
    frames_per_step: int = Field(0, ge=0)
    #: Weight of two auxiliary losses on F_g: each scene's colour and shape (known from its
    #: questions), read off by linear heads as in stage 0. 0 = the task loss alone (the paper's).
    #: The loader must then give ``color`` and ``shape`` (``make_loader(..., attributes=True)``).
    aux_weight: float = Field(0.0, ge=0)


class AttributeHeads(nn.Module):
    """The stage-1 model with colour and shape heads on F_g beside its answer head (training only;
    the heads are saved as ``aux.*`` in the checkpoint, the model's tensors stay ``model.*``)."""

    def __init__(self, model: GlobalModel, seed: int) -> None:
        super().__init__()
        self.model = model
        dim = model.encoder.feature_dim
        # Their own seed: the heads start alike whatever the caller drew before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.color = nn.Linear(dim, len(COLORS))
            self.shape = nn.Linear(dim, len(SHAPES))

    def attribute_heads(self) -> tuple[tuple[str, nn.Linear], ...]:
        """The heads by the name their tensors have under ``aux.`` in the checkpoint."""
        return ("color", self.color), ("shape", self.shape)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.model.clip_features(batch)
        return self.model.classifier(self.model.static(f)), self.color(f), self.shape(f)


def attribute_loss(net: nn.Module, batch: Mapping[str, torch.Tensor], weight: float,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the task cross-entropy plus ``weight`` × the colour and shape cross-entropies
    (unknown attributes, -100, left out; a batch with none known adds 0, with no host sync)."""
    if "color" not in batch or "shape" not in batch:
        raise ValueError("stage1.aux_weight > 0 needs batches with each scene's color and shape "
                         "(make_loader(..., attributes=True))")
    with autocast(device):
        logits, color, shape = net(batch)
    logits = logits.float()
    loss = nn.functional.cross_entropy(logits, batch["label"], ignore_index=IGNORE)
    for out, key in ((color, "color"), (shape, "shape")):
        target = batch[key]
        total = nn.functional.cross_entropy(out.float(), target, ignore_index=IGNORE, reduction="sum")
        loss = loss + weight * total / (target != IGNORE).sum().clamp(min=1)
    return logits, loss


def sample_global_frames(batch: Mapping[str, torch.Tensor], k: int) -> Mapping[str, torch.Tensor]:
    """``batch`` with each clip's ``global_index`` cut to ``k`` of its frames, drawn uniformly
    without replacement from the global RNG (``k`` = 0, or at least D: ``batch`` itself, not copied)."""
    idx = batch["global_index"]
    if k == 0 or k >= idx.shape[1]:
        return batch
    pick = torch.rand(idx.shape).argsort(dim=1)[:, :k].to(idx.device)
    return {**batch, "global_index": idx.gather(1, pick)}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                # A CPU copy: checkpoints do not depend on the device that trained.
                out[f"optim.{pid}.{key}"] = value.detach().cpu().clone().reshape(value.shape)
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
    check_every: int = 50,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs``; resume from ``ckpt_dir`` when it holds a partial run.

    ``loader_factory(epoch)`` returns that epoch's batches (reshuffled by a seed
    derived from ``seed`` and the epoch, so a resumed run sees the same data).
    Returns the training history (per-epoch loss, accuracy, seconds).

    Under torchrun pass ``dist`` (:func:`~stablesynth.training.distributed.init_distributed`):
    the model runs under DistributedDataParallel, ``loader_factory`` must yield this
    rank's shard (every rank the same number of batches), epoch metrics are summed over
    ranks, and only rank 0 writes the checkpoint and the log.

    ``device`` (default CPU; under torchrun with NCCL, this rank's GPU) is where the model
    and the batches go: ``model`` is moved there and stays there. On CPU the run is exactly
    the fp32 one; on CUDA the forward pass runs under bf16 autocast and the metrics stay on
    the GPU until the epoch ends (a non-finite loss is caught within ``check_every`` steps).
    """
    ctx = dist or SINGLE
    log = ctx.log(log)
    dev = training_device(device, ctx)
    configure_backends(dev)
    on_cpu = dev.type == "cpu"
    # With auxiliary heads, they train with the model (and are optimised and saved with it).
    heads = AttributeHeads(model, seed) if cfg.aux_weight > 0 else None
    trained: nn.Module = model if heads is None else heads
    trained.to(dev)
    net = ctx.wrap(trained)
    opt = make_optimizer(trained, cfg.lr, cfg.weight_decay, dev)
    steps_per_epoch = len(loader_factory(0))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    sched = make_scheduler(opt, total, warmup, cfg.power)

    history: list[dict[str, float]] = []
    start_epoch = 0
    if (ckpt_dir / "manifest.json").exists():
        try:
            tensors, manifest = load_checkpoint(ckpt_dir, expect_kind="stage1")
        except CheckpointError:
            raise
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        if heads is not None:
            aux = {k[len("aux."):]: v for k, v in tensors.items() if k.startswith("aux.")}
            if not aux:
                raise CheckpointError(f"checkpoint {ckpt_dir} was trained without stage1.aux_weight")
            for name, part in heads.attribute_heads():
                part.load_state_dict({k[len(name) + 1:]: v for k, v in aux.items() if k.startswith(name + ".")})
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
        trained.train()
        t0 = time.perf_counter()
        total_loss, correct, count = 0.0, 0, 0
        batches: Iterable = loader_factory(epoch)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"stage 1 epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=True if not ctx.is_main else None)
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss·n, correct, n (accelerators only)
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            batch = sample_global_frames(batch, cfg.frames_per_step)
            if not on_cpu:
                batch = to_device(batch, dev, non_blocking=True)
            if heads is None:
                logits, loss = forward_loss(net, batch, dev)
            else:
                logits, loss = attribute_loss(net, batch, cfg.aux_weight, dev)
            if on_cpu:
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"stage 1: loss became {float(loss)} at epoch {epoch + 1} step {step}")
            else:
                # No host sync per step: the check waits for the next ``check_every`` boundary.
                nonfinite |= ~torch.isfinite(loss.detach())
                if (step + 1) % check_every == 0 and bool(nonfinite):
                    raise FloatingPointError(f"stage 1: loss became non-finite at epoch {epoch + 1} "
                                             f"by step {step}")
            optimizer_step(loss, model, opt, sched, cfg.grad_clip)
            valid = batch["label"] != -100
            if on_cpu:
                n = int(valid.sum())
                total_loss += loss.item() * n
                correct += int((logits.argmax(-1) == batch["label"])[valid].sum())
                count += n
                bar.set_postfix(loss=f"{total_loss / max(count, 1):.3f}", acc=f"{correct / max(count, 1):.3f}")
            else:
                n_valid = valid.sum()
                sums += torch.stack([loss.detach().double() * n_valid,
                                     ((logits.argmax(-1) == batch["label"]) & valid).sum().double(),
                                     n_valid.double()])
        bar.close()
        if not on_cpu:
            if bool(nonfinite):
                raise FloatingPointError(f"stage 1: loss became non-finite in epoch {epoch + 1}")
            loss_sum, correct_sum, count_sum = sums.tolist()
            total_loss, correct, count = loss_sum, int(correct_sum), int(count_sum)
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
            tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            if heads is not None:
                for name, part in heads.attribute_heads():
                    tensors.update({f"aux.{name}.{k}": v.detach().cpu().contiguous()
                                    for k, v in part.state_dict().items()})
            tensors.update(_optimizer_tensors(opt))
            save_checkpoint(ckpt_dir, tensors, {
                "kind": "stage1", "epoch": epoch + 1, "history": history, "config": cfg.to_dict(),
                **(dict(manifest_extra) if manifest_extra else {}),
            })
        # Other ranks may read the checkpoint next (resume, feature extraction): wait for it.
        ctx.barrier()
    return {"history": history, "resumed_from": start_epoch, "trained_epochs": cfg.epochs - start_epoch}
