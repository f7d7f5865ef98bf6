"""Resolving the ``device`` settings of the config (``auto | cpu | cuda | cuda:N``)."""
from __future__ import annotations

import torch


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a usable device.

    Args:
        name: the configured value. key: the config key it came from, named in errors.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}: {name!r} is not a device (auto | cpu | cuda | cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}: {name!r} is not supported (auto | cpu | cuda | cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: {name!r} requested but CUDA is not available here")
    return device
