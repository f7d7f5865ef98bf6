"""Initialising a fine-tuning detector from a pre-training checkpoint (MutDet or DETReg).

Transfer rule (METHOD.md, "Transfer to fine-tuning"): drop the mutual enhancement module, the
embedding heads, the pre-training classifier (256 pseudo-classes or the DETReg objectness) and the
denoising label embedding; keep backbone, neck, encoder, decoder, box and angle branches, query and
level embeddings and the encoder proposal head. Every dropped key is reported with its reason:

* ``pretraining-only``: the key's name matches :data:`DROP_PATTERNS`;
* ``shape``: the fine-tuning model has the key with another shape;
* ``unknown``: the fine-tuning model has no such key.

Fine-tuning keys that the checkpoint does not provide keep their fresh initialisation and are
reported as ``missing``.

The pattern list follows the module names planned for the pre-training model
(``mutual_enhancement``, ``*embedding_head*``); check it against the pre-training module once it
exists (a test there should load its checkpoint through :func:`load_pretrained`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from mutdet.engine.checkpoint import load_checkpoint

__all__ = ["DROP_PATTERNS", "transfer_state_dict", "load_pretrained"]

log = logging.getLogger("mutdet")

DROP_PATTERNS = (
    r"^mutual_enhancement\.",
    r"embedding_head",  # encoder / decoder embedding heads
    r"^class_heads\.",  # pre-training classifier (pseudo-classes / objectness)
    r"^label_embed\.",  # denoising label embedding (one row per pre-training class)
)


def transfer_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                        drop_patterns=DROP_PATTERNS) -> tuple[dict[str, torch.Tensor], dict]:
    """Select the entries of ``source`` to load into a model whose state dict is ``target``.

    Returns ``(kept, report)``; ``report`` = ``{"loaded": [...], "dropped": {key: reason},
    "missing": [...]}``.
    """
    kept, dropped = {}, {}
    for key, value in source.items():
        if any(re.search(p, key) for p in drop_patterns):
            dropped[key] = "pretraining-only"
        elif key not in target:
            dropped[key] = "unknown"
        elif tuple(target[key].shape) != tuple(value.shape):
            dropped[key] = f"shape {tuple(value.shape)} != {tuple(target[key].shape)}"
        else:
            kept[key] = value
    missing = sorted(k for k in target if k not in kept)
    return kept, {"loaded": sorted(kept), "dropped": dict(sorted(dropped.items())), "missing": missing}


def load_pretrained(model: nn.Module, path: str | Path) -> dict:
    """Load the transferable weights of a pre-training checkpoint (``model`` entry of a
    :mod:`mutdet.engine.checkpoint` file) into ``model``; returns the report of
    :func:`transfer_state_dict` and logs a summary."""
    ckpt = load_checkpoint(path)
    kept, report = transfer_state_dict(ckpt["model"], model.state_dict())
    if not kept:
        raise ValueError(f"{path}: no weight of this checkpoint fits the fine-tuning model "
                         f"(dropped: {list(report['dropped'].items())[:5]})")
    model.load_state_dict(kept, strict=False)
    log.info("init from %s: %d tensors loaded, %d dropped, %d left at their fresh initialisation",
             path, len(report["loaded"]), len(report["dropped"]), len(report["missing"]))
    for key, reason in report["dropped"].items():
        log.info("  dropped %s (%s)", key, reason)
    return {"source": str(path), **report}
