"""Processes: rank / world-size helpers (no-ops without a process group) and the DDP wrap.

One code path: a plain ``python`` run is world size 1; ``torchrun --nproc_per_node N ...`` sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, and :func:`init_distributed` (called once, by the
trainer's caller) starts the process group from them. Only rank 0 writes files
(:func:`is_main_process`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process", "barrier",
           "wrap_model", "unwrap_model", "reduce_mean", "all_ranks_true"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: torch.device) -> torch.device:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1); return the device of
    this process (``cuda:LOCAL_RANK`` for a CUDA run). Without torchrun: returns ``device`` unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP wrap when a process group is running, else ``model`` itself. ``find_unused_parameters``
    is on: some heads (e.g. the denoising label embedding) get no gradient in some steps."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True iff ``flag`` is true on every rank (``flag`` itself without a process group)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() == 0)


def reduce_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar values over the ranks that have them (identity without a process group).

    Ranks may hold different keys (e.g. denoising losses exist only for batches with objects): the
    union of keys is gathered first, so every rank issues the same collectives.
    """
    if not is_distributed():
        return dict(values)
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, sorted(values))
    keys = sorted(set().union(*gathered))
    t = torch.tensor([[float(values.get(k, 0.0)), float(k in values)] for k in keys], dtype=torch.float64,
                     device=device).reshape(-1, 2)
    dist.all_reduce(t)
    return {k: float(total / count) for k, (total, count) in zip(keys, t.tolist()) if count > 0}
