"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict:

=================  ========================================================================
``model``          state dict of the (unwrapped) model
``optimizer``      optimiser state dict (None for a weights-only export)
``scheduler``      lr-scheduler state dict (or None)
``epoch``          epoch in progress (0-based) when saved
``batch``          micro-batches of that epoch already consumed (0: epoch start)
``step``           optimiser steps done so far
``rng``            ``{"python": list, "numpy": list, "torch": ByteTensor, "cuda": [ByteTensor]}``
``config``         the resolved run configuration (JSON-like dict: model and training keywords...)
``meta``           free JSON-like dict (code version, finished flag, ...)
=================  ========================================================================

Every value is a type that ``weights_only=True`` accepts (tensors, dicts, lists, str, int, float,
bool, None): RNG states are converted to lists / tensors here and back in :func:`set_rng_state`.
"""
from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mutdet.io.atomic import atomic_path

__all__ = ["get_rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "json_safe"]


def json_safe(value) -> object:
    """A JSON round trip (paths and other objects become strings): safe for ``weights_only``."""
    return json.loads(json.dumps(value, default=str))


def seed_all(seed: int) -> None:
    """Seed the Python, NumPy (legacy global) and torch RNGs: a run's checkpoints, which store all three
    states, are then byte-identical across identical runs (a fine-tuning job keys its resume state to
    its init checkpoint's bytes)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Python, NumPy (legacy global) and torch (CPU, every CUDA device) RNG states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only if the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location="cuda" moved it
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(path: str | Path, *, model: torch.nn.Module | Mapping, optimizer=None, scheduler=None,
                    epoch: int = 0, batch: int = 0, step: int = 0, config: Mapping | None = None,
                    meta: Mapping | None = None, rng: Mapping | None = None) -> Path:
    """Write a checkpoint atomically (temporary file beside ``path`` + ``os.replace``).

    Args:
        model: a module (saved through its ``state_dict``) or a state dict.
        optimizer, scheduler: objects with ``state_dict()``, or None.
        epoch, batch, step: training position (see the module docstring).
        config, meta: JSON-like dicts (made JSON-safe here).
        rng: RNG state to store (default: the current one, :func:`get_rng_state`).
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    payload = {
        "model": state,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch), "batch": int(batch), "step": int(step),
        "rng": dict(rng) if rng is not None else get_rng_state(),
        "config": json_safe(dict(config or {})),
        "meta": json_safe(dict(meta or {})),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a missing or unreadable file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: not a readable checkpoint: the file is empty")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, random bytes, a pickle of objects weights_only refuses
        # torch's own text advises weights_only=False, i.e. running the file's code: never say that.
        kind = "not a pickle of plain tensors and containers" if "Weights only load failed" in str(
            exc) else (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {kind}); mutdet reads "
                         "checkpoints as plain tensors only: re-create the file with mutdet") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a mutdet checkpoint (no 'model' entry)")
    return ckpt
