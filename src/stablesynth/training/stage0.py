"""Stage 0: pretrain the encoder (and a head) on clean easy-VQA, once, cached by its inputs.

The paper starts from a *pretrained* All-in-One; stage 0 plays that part for the CPU
encoder: encoder + the global model's head (StaticHead → Linear to easy-VQA's answers)
trained on the train split's scenes with no device profile and all their questions,
plus auxiliary colour and shape heads on the fused 192-d feature (every scene's colour
and shape are known from its questions), which is what teaches a small from-scratch
encoder to see shapes within a CPU budget. Optional camera-like augmentation
(``augment="camera"``) renders each image through a random capture profile; the
default (``"none"``) is the paper-like public pretraining that knows nothing of the
cameras.

:func:`pretrain_stage0` trains once into ``cache_root/<encoder>-<key>/`` where the key
hashes the encoder preset and overrides, the stage-0 config and the data's fingerprint;
a finished checkpoint is reused (any run, any run seed), an interrupted one resumes after
its last epoch. All randomness (initialisation, shuffling, dropout, augmentation) is
drawn under ``cfg.seed`` inside a forked RNG, so the caller's global RNG is the same
whether stage 0 trained or was loaded. :func:`load_stage0` puts the result into a
:class:`~stablesynth.models.global_model.GlobalModel` before stage 1, mapping the head's
rows onto the benchmark's answers by name.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from stablesynth.accelerator import configure_backends, to_device
from stablesynth.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from stablesynth.config import Config
from stablesynth.data.easyvqa import COLORS, IGNORE, QUESTION_TYPES, SHAPES
from stablesynth.data.pretrain import PretrainSet, build_pretrain_set
from stablesynth.models.device import HIDDEN_DIM, StaticHead
from stablesynth.models.encoder import ENCODERS, create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.stage1 import _load_optimizer, _optimizer_tensors
from stablesynth.training.steps import make_optimizer, make_scheduler, optimizer_step

#: Bump when the stage-0 recipe changes what a config produces (old caches then go unused).
STAGE0_VERSION = 1
KIND = "stage0"


class Stage0Config(Config):
    """Stage-0 pretraining (clean easy-VQA train split, all questions).

    ``augment``: ``none`` (public pretraining that knows nothing of the cameras, the
    paper-like default) or ``camera`` (each image through a random capture profile drawn
    from the benchmark's default ranges). ``aux_color_weight`` / ``aux_shape_weight`` weight
    the cross-entropy of the scene's colour / shape predicted from the fused feature.
    """

    seed: int = 0
    epochs: int = Field(2, ge=1)
    lr: float = Field(1.0e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(64, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    power: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    head_dropout: float = Field(0.1, ge=0, lt=1)
    aux_color_weight: float = Field(1.0, ge=0)
    aux_shape_weight: float = Field(1.0, ge=0)
    #: Fraction of all steps trained on the colour/shape losses alone before the answer loss
    #: joins: the answers' text priors are learnt fast and can starve vision (small encoders).
    answer_warmup_ratio: float = Field(0.0, ge=0, lt=1)
    augment: Literal["none", "camera"] = "none"
    #: Train on the first N questions only (0 = all; tests and quick checks).
    limit_questions: int = Field(0, ge=0)
    #: Cap on the steps of one epoch (0 = no cap).
    max_steps_per_epoch: int = Field(0, ge=0)
    #: Score the finished model on easy-VQA's clean test split (recorded in the manifest).
    evaluate: bool = True


class PretrainModel(nn.Module):
    """Encoder + the global model's head over easy-VQA's answers + colour/shape heads on the feature."""

    def __init__(self, encoder: nn.Module, num_answers: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.static = StaticHead(encoder.feature_dim, HIDDEN_DIM, dropout)
        self.classifier = nn.Linear(HIDDEN_DIM, num_answers)
        self.aux_color = nn.Linear(encoder.feature_dim, len(COLORS))
        self.aux_shape = nn.Linear(encoder.feature_dim, len(SHAPES))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.encoder(batch["frames"], batch["input_ids"], batch["attention_mask"]).mean(dim=1)
        return self.classifier(self.static(f)), self.aux_color(f), self.aux_shape(f)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage0_key(encoder_name: str, encoder_overrides: Mapping[str, Any], cfg: Stage0Config,
               data_fingerprint: str) -> dict[str, Any]:
    """What a stage-0 checkpoint depends on (the full encoder config, not just the preset name)."""
    enc = ENCODERS.get(encoder_name).replace(**dict(encoder_overrides)).to_dict()
    return {"version": STAGE0_VERSION, "encoder": encoder_name, "encoder_config": enc,
            "config": cfg.to_dict(), "data": data_fingerprint}


def stage0_dir(cache_root: Path, key: Mapping[str, Any]) -> Path:
    """``cache_root/<encoder>-<hash of key>``: one folder per distinct stage 0."""
    return Path(cache_root) / f"{key['encoder']}-{_hash(dict(key))}"


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def _losses(model: nn.Module, batch: Mapping[str, torch.Tensor], cfg: Stage0Config, answers: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    logits, color, shape = model(batch)
    ce = nn.functional.cross_entropy
    loss = ce(logits, batch["label"]) * (1.0 if answers else 0.0)
    for w, out, key in ((cfg.aux_color_weight, color, "color"), (cfg.aux_shape_weight, shape, "shape")):
        if w > 0 and bool((batch[key] != IGNORE).any()):
            loss = loss + w * ce(out, batch[key], ignore_index=IGNORE)
    return logits, loss


@torch.no_grad()
def evaluate_pretrained(model: nn.Module, data: PretrainSet, batch_size: int = 256,
                        profiles: torch.Tensor | None = None, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Answer accuracy (overall and per question type) of ``model`` on ``data``.

    ``profiles`` (``[P, PROFILE_DIM]`` capture-profile rows): each question's scene is
    rendered through profile ``question % P`` with sensor noise drawn from ``seed``.
    ``model`` is a :class:`PretrainModel` or a callable returning logits first.
    """
    from stablesynth.data.benchmark import normalise_frames
    from stablesynth.data.devices import apply_profiles

    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    preds = []
    for i in range(0, len(data), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(data)))
        batch = data.batch(rows)
        if profiles is not None:
            frames = data.frames[data.image[rows]]
            noise = torch.randn(frames.shape, generator=g)
            shot = apply_profiles(frames, profiles[rows % len(profiles)], noise)
            batch["frames"] = normalise_frames(shot).unsqueeze(1)
        out = model(to_device(batch, torch.device(device)))
        preds.append(torch.stack([o.argmax(-1).cpu() for o in out], dim=1) if isinstance(out, tuple)
                     else out.argmax(-1).cpu().unsqueeze(1))
    model.train(was_training)
    pred = torch.cat(preds)
    correct = (pred[:, 0] == data.label).float()
    result = {"accuracy": float(correct.mean())}
    if pred.shape[1] == 3:  # the scene's colour and shape read off the feature (a probe of vision alone)
        for j, (name, truth) in enumerate((("color", data.color), ("shape", data.shape)), start=1):
            known = truth[data.image] != IGNORE
            result[f"aux_{name}"] = float((pred[known, j] == truth[data.image][known]).float().mean())
    for t, name in enumerate(QUESTION_TYPES):
        sel = data.question_type == t
        if bool(sel.any()):
            result[f"accuracy_{name}"] = float(correct[sel].mean())
    return result


def _is_finished(ckpt: Path, epochs: int) -> bool:
    try:
        return int(read_manifest(ckpt).get("epoch", 0)) >= epochs
    except CheckpointError:
        return False


def pretrain_stage0(
    encoder_name: str,
    encoder_overrides: Mapping[str, Any] | None,
    cfg: Stage0Config,
    cache_root: Path,
    log: Callable[[str], None] = print,
    data: PretrainSet | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """The stage-0 checkpoint folder for these inputs, trained now only if it is not cached.

    ``data`` defaults to easy-VQA's clean train split at the encoder's input size. Returns
    the checkpoint folder (kind ``stage0``; tensors ``model.*``, manifest with the key,
    ``answers``, per-epoch ``history``, ``clean_test`` accuracies and ``seconds``).
    """
    overrides = dict(encoder_overrides or {})
    enc_cfg = ENCODERS.get(encoder_name).replace(**overrides)
    t0 = time.perf_counter()
    if data is None:
        data = build_pretrain_set("train", enc_cfg.image_size, enc_cfg.max_text_len)
    key = stage0_key(encoder_name, overrides, cfg, data.fingerprint)
    ckpt = stage0_dir(cache_root, key)
    if _is_finished(ckpt, cfg.epochs):
        log(f"stage 0: reusing {ckpt}")
        return ckpt
    dev = torch.device(device)
    configure_backends(dev)
    # Everything random happens under cfg.seed and leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = PretrainModel(create_model(encoder_name, **overrides), len(data.answers), cfg.head_dropout)
        _train(model, data, cfg, ckpt, key, log, dev, t0)
    return ckpt


def _train(model: PretrainModel, data: PretrainSet, cfg: Stage0Config, ckpt: Path, key: Mapping[str, Any],
           log: Callable[[str], None], dev: torch.device, t0: float) -> None:
    n = min(len(data), cfg.limit_questions) if cfg.limit_questions else len(data)
    steps = n // cfg.batch_size or 1
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    model.to(dev)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, dev)
    sched = make_scheduler(opt, steps * cfg.epochs, int(cfg.warmup_ratio * steps * cfg.epochs), cfg.power)
    answers_from = int(cfg.answer_warmup_ratio * steps * cfg.epochs)
    history: list[dict[str, float]] = []
    start = 0
    if (ckpt / "manifest.json").exists():
        try:
            tensors, manifest = load_checkpoint(ckpt, expect_kind=KIND)
            if manifest.get("key") != json.loads(json.dumps(dict(key))):
                raise CheckpointError(f"checkpoint {ckpt} holds another stage 0")
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            _load_optimizer(opt, tensors)
            start, history = int(manifest["epoch"]), list(manifest.get("history", []))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start * steps):
                    sched.step()
            log(f"stage 0: resuming {ckpt} at epoch {start + 1}/{cfg.epochs}")
        except CheckpointError as exc:
            log(f"stage 0: {exc}; training again")
            start, history = 0, []
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)
        aug = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 500)
        order = _epoch_order(n, cfg.seed, epoch)
        model.train()
        t = time.perf_counter()
        total, correct, count = 0.0, 0, 0
        bar = tqdm(range(steps), desc=f"stage 0 epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for step in bar:
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = to_device(data.batch(rows, aug, augment=cfg.augment == "camera"), dev)
            logits, loss = _losses(model, batch, cfg, answers=epoch * steps + step >= answers_from)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage 0: loss became {float(loss)} at epoch {epoch + 1} step {step}")
            optimizer_step(loss, model, opt, sched, cfg.grad_clip)
            total += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(-1) == batch["label"]).sum())
            count += len(rows)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / count:.3f}", acc=f"{correct / count:.3f}")
        bar.close()
        record = {"epoch": epoch + 1, "loss": total / max(count, 1), "train_accuracy": correct / max(count, 1),
                  "seconds": time.perf_counter() - t}
        history.append(record)
        log(f"stage 0 epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
            f"train acc {record['train_accuracy']:.3f} ({record['seconds']:.1f} s)")
        extra: dict[str, Any] = {}
        if epoch + 1 == cfg.epochs and cfg.evaluate:
            test = build_pretrain_set("test", model.encoder.cfg.image_size, model.encoder.cfg.max_text_len)
            extra["clean_test"] = evaluate_pretrained(model, test, device=dev)
            log("stage 0 clean test: " + ", ".join(f"{k} {v:.3f}" for k, v in extra["clean_test"].items()))
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if epoch + 1 < cfg.epochs:
            tensors.update(_optimizer_tensors(opt))  # a finished stage 0 needs no optimizer state
        save_checkpoint(ckpt, tensors, {
            "kind": KIND, "epoch": epoch + 1, "history": history, "key": dict(key),
            "answers": list(data.answers), "questions": n, "seconds": time.perf_counter() - t0, **extra})
    model.cpu()


def load_stage0(model: GlobalModel, ckpt: Path, answer_names: Sequence[str],
                head: bool = True) -> dict[str, Any]:
    """Copy a stage-0 checkpoint into ``model`` (in place); returns its manifest.

    The encoder must match exactly. With ``head``, the static MLP is copied and each row
    of the last layer whose answer name is in ``answer_names`` is copied to that answer's
    row (answers stage 0 never saw keep their initialisation).
    """
    tensors, manifest = load_checkpoint(ckpt, expect_kind=KIND)
    enc = {k[len("model.encoder."):]: v for k, v in tensors.items() if k.startswith("model.encoder.")}
    try:
        model.encoder.load_state_dict(enc, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this encoder: {str(exc).splitlines()[0]}") from None
    if head:
        static = {k[len("model.static."):]: v for k, v in tensors.items() if k.startswith("model.static.")}
        model.static.load_state_dict(static, strict=True)
        index = {a: i for i, a in enumerate(manifest["answers"])}
        with torch.no_grad():
            for row, name in enumerate(answer_names):
                if name in index:
                    model.classifier.weight[row].copy_(tensors["model.classifier.weight"][index[name]])
                    model.classifier.bias[row].copy_(tensors["model.classifier.bias"][index[name]])
    return manifest
