"""One stage-1 optimisation step, shared by :func:`~stablesynth.training.stage1.train_stage1` and
``stablesynth bench train`` (so the benchmark times the code that trains).

It imports only torch and :mod:`stablesynth.accelerator`. On CPU every function here
does exactly what stage 1 always did (fp32, the same operations in the same order);
on CUDA the forward pass runs under bf16 autocast and AdamW uses its fused kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from stablesynth.accelerator import autocast, is_cuda


def polynomial_decay(step: int, total: int, warmup: int, power: float = 1.0) -> float:
    """Linear warm-up then polynomial decay to 0 (the All-in-One schedule)."""
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (1.0 - progress) ** power


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms, embeddings and tokens; fused kernels on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if is_cuda(device):
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(opt: torch.optim.Optimizer, total: int, warmup: int,
                   power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: polynomial_decay(s, total, warmup, power))


def forward_loss(net: nn.Module, batch: Mapping[str, torch.Tensor],
                 device: torch.device | str = "cpu", amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the cross-entropy (answers labelled -100 ignored); bf16 autocast on CUDA."""
    with autocast(device, amp):
        logits = net(batch)
    # The loss is taken in fp32 (a no-op on CPU, where logits already are).
    logits = logits.float()
    return logits, nn.functional.cross_entropy(logits, batch["label"], ignore_index=-100)


def optimizer_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler | None, grad_clip: float) -> None:
    """Backward, clip the gradient norm (when ``grad_clip`` > 0), step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
