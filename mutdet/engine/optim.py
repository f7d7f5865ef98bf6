"""Optimiser and learning-rate schedule of the paper's detector recipe.

AdamW (lr 1e-4, weight decay 1e-5 on every parameter, betas (0.9, 0.999)) with two lr groups: the
parameters of three *roles* train at ``lr x lr_multiplier`` (0.1), everything else at ``lr``. Frozen
parameters (``requires_grad=False``) are left out. The roles (:data:`LOW_LR_NAMES`) are found by module
type, wherever the module sits in the model, so the rule is the same for the fine-tuning detector
(``backbone.*``), the pre-training model that wraps it (``detector.backbone.*``) and a DDP wrapper
(``module.*``):

``backbone``          every parameter of a :class:`mutdet.models.backbone.Backbone` (Deformable DETR's
                      ``lr_backbone``, ARS-DETR / MutDet's ``custom_keys={'backbone': lr_mult 0.1}``).
``sampling_offsets``  the ``sampling_offsets`` Linear of every
                      :class:`mutdet.models.deformable_attention.MultiScaleDeformableAttention`, encoder
                      and decoder (Deformable DETR's ``lr_linear_proj_names``).
``reference_points``  a submodule registered under the name ``reference_points``: the learned
                      query -> reference-point Linear of *one-stage* Deformable DETR. The two-stage
                      detector here has none (its references come from the encoder proposals, as in
                      ARS-DETR with ``as_two_stage=True``), so this role is empty; it is kept so that the
                      rule is the reference's whole rule.

Checked against the references, and why each other parameter stays at the full rate:

* The references match these keys as *substrings* of the parameter name (mmcv's ``custom_keys``,
  Deformable DETR's ``match_name_keywords``), so a wrapper prefix does not escape them; a prefix rule
  (``name.startswith("backbone.")``) does, which left the backbone at the full rate in pre-training
  with ``freeze_backbone: false``. Matching by type has neither problem, and does not catch a module
  that merely has ``backbone`` in its name.
* The decoder's ``ref_point_head`` (MLP from the reference box's sine embedding to the query position)
  is not a ``reference_points`` layer: in ARS-DETR it is also named ``ref_point_head`` and no key
  matches it, so it trains at the full rate there and here.
* The neck (Deformable DETR's ``input_proj``, ARS-DETR's ``neck``), ``attention_weights``,
  ``value_proj``, ``output_proj``, the level embedding, the query and denoising label embeddings, the
  heads and MutDet's modules (enhancement, embedding heads) all train at the full rate in the
  references too.
* Norms and biases get the same weight decay as the rest (mmcv's constructor without
  ``norm_decay_mult`` / ``bias_decay_mult``; Deformable DETR likewise).

Schedule, stepped once per optimiser step (iteration): linear warm-up from ``lr x warmup_ratio``
(1/3) to ``lr`` over ``warmup_iterations`` (mmcv's ``warmup='linear'``), then x ``gamma`` (0.1) at
each milestone iteration (the caller converts decay epochs to iterations:
``epoch x iterations_per_epoch``, which is mmcv's by-epoch ``step`` policy).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mutdet.models.backbone import Backbone
from mutdet.models.deformable_attention import MultiScaleDeformableAttention

__all__ = ["LOW_LR_NAMES", "low_lr_roles", "param_groups", "build_optimizer", "WarmupStepSchedule",
           "build_scheduler"]

LOW_LR_NAMES = ("backbone", "sampling_offsets", "reference_points")


def _role_modules(model: nn.Module, roles: Sequence[str]):
    """``(role, module)`` for every module that plays one of ``roles`` (module docstring)."""
    unknown = sorted(set(roles) - set(LOW_LR_NAMES))
    if unknown:
        raise ValueError(f"low-lr roles {unknown} are unknown; known: {list(LOW_LR_NAMES)} "
                         f"(modules are found by type, not by a parameter-name pattern)")
    for name, module in model.named_modules():
        if "backbone" in roles and isinstance(module, Backbone):
            yield "backbone", module
        if "sampling_offsets" in roles and isinstance(module, MultiScaleDeformableAttention):
            yield "sampling_offsets", module.sampling_offsets
        if "reference_points" in roles and name.rpartition(".")[2] == "reference_points":
            yield "reference_points", module


def low_lr_roles(model: nn.Module, low_lr_names: Sequence[str] = LOW_LR_NAMES) -> dict[str, str]:
    """Parameter name -> role, for every parameter (trainable or not) that trains at the low lr."""
    low = {id(p): role for role, module in _role_modules(model, low_lr_names) for p in module.parameters()}
    return {name: low[id(p)] for name, p in model.named_parameters() if id(p) in low}


def param_groups(model: nn.Module, *, lr: float, lr_multiplier: float = 0.1,
                 low_lr_names: Sequence[str] = LOW_LR_NAMES) -> list[dict]:
    """Trainable parameters split into ``[{"name": "base", ...}, {"name": "low_lr", ...}]``.

    ``low_lr_names``: the roles (module docstring) that train at ``lr x lr_multiplier``; an unknown
    role raises. Empty groups are dropped.
    """
    low = {id(p) for role, module in _role_modules(model, low_lr_names) for p in module.parameters()}
    base, low_params = [], []
    for p in model.parameters():
        if p.requires_grad:
            (low_params if id(p) in low else base).append(p)
    groups = [{"name": "base", "params": base, "lr": lr},
              {"name": "low_lr", "params": low_params, "lr": lr * lr_multiplier}]
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
