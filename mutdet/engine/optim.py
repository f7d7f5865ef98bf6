"""Optimiser and learning-rate schedule of the paper's detector recipe.

AdamW (lr 1e-4, weight decay 1e-5) with three lr groups identified by parameter name: the
backbone (``backbone.*``), the deformable-attention sampling offsets (``*sampling_offsets*``) and
reference points (``*reference_points*``, present in one-stage variants only) train at
``lr x lr_multiplier`` (0.1); everything else at ``lr``. Frozen parameters (``requires_grad=False``)
are left out.

Schedule, stepped once per optimiser step (iteration): linear warm-up from ``lr x warmup_ratio``
(1/3) to ``lr`` over ``warmup_iterations`` (mmcv's ``warmup='linear'``), then x ``gamma`` (0.1) at
each milestone iteration (the caller converts decay epochs to iterations:
``epoch x iterations_per_epoch``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["LOW_LR_NAMES", "param_groups", "build_optimizer", "WarmupStepSchedule", "build_scheduler"]

LOW_LR_NAMES = ("backbone.", "sampling_offsets", "reference_points")


def _is_low_lr(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p) if p.endswith(".") else p in name for p in patterns)


def param_groups(model: nn.Module, *, lr: float, lr_multiplier: float = 0.1,
                 low_lr_names: Sequence[str] = LOW_LR_NAMES) -> list[dict]:
    """Trainable parameters split into ``[{"name": "base", ...}, {"name": "low_lr", ...}]``.

    A pattern ending in ``.`` matches a name prefix (``backbone.``); any other pattern matches a
    substring (``sampling_offsets``). Empty groups are dropped.
    """
    base, low = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (low if _is_low_lr(name, low_lr_names) else base).append(p)
    groups = [{"name": "base", "params": base, "lr": lr},
              {"name": "low_lr", "params": low, "lr": lr * lr_multiplier}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, *, lr: float = 1e-4, weight_decay: float = 1e-5, lr_multiplier: float = 0.1,
                    low_lr_names: Sequence[str] = LOW_LR_NAMES) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    groups = param_groups(model, lr=lr, lr_multiplier=lr_multiplier, low_lr_names=low_lr_names)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


class WarmupStepSchedule:
    """lr factor of iteration ``step`` (0-based): linear warm-up, then step decay.

    A plain callable object (not a lambda), so ``LambdaLR.state_dict()`` stores its settings.
    """

    def __init__(self, *, warmup_iterations: int = 500, warmup_ratio: float = 1 / 3,
                 milestones: Sequence[int] = (), gamma: float = 0.1):
        if warmup_iterations < 0 or not 0 < warmup_ratio <= 1:
            raise ValueError(f"warmup_iterations must be >= 0 and warmup_ratio in (0, 1], "
                             f"got {warmup_iterations}, {warmup_ratio}")
        self.warmup_iterations = int(warmup_iterations)
        self.warmup_ratio = float(warmup_ratio)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        decay = self.gamma ** sum(step >= m for m in self.milestones)
        if step < self.warmup_iterations:
            return decay * (1 - (1 - self.warmup_ratio) * (1 - step / self.warmup_iterations))
        return decay


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_iterations: int = 500, warmup_ratio: float = 1 / 3,
                    milestones: Sequence[int] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :class:`WarmupStepSchedule` (call ``.step()`` after each optimiser step)."""
    schedule = WarmupStepSchedule(warmup_iterations=warmup_iterations, warmup_ratio=warmup_ratio,
                                  milestones=milestones, gamma=gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
