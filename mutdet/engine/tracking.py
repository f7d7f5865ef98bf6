"""Metrics tracking: a JSON-lines file (always) and Weights & Biases (optional, never required).

wandb mode: the ``wandb_mode`` argument if given, else the ``WANDB_MODE`` environment variable, else
``offline`` (runs land in ``<out_dir>/wandb`` for a later ``wandb sync``). ``disabled`` (what the
tests use) or a missing ``wandb`` package means JSON lines only. Only rank 0 should build a tracker
that writes (the trainer passes ``enabled=False`` elsewhere).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Tracker", "read_jsonl", "resolve_wandb_mode"]

log = logging.getLogger("mutdet")
WANDB_MODES = ("online", "offline", "disabled")


def resolve_wandb_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode {mode!r}: expected one of {WANDB_MODES}")
    return mode


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines file ([] if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class Tracker:
    """Append metrics records to ``metrics_path`` (one JSON object a line) and mirror them to wandb.

    Args:
        metrics_path: the JSON-lines file.
        enabled: False on ranks other than 0 (nothing is written).
        wandb_mode: see the module docstring. project, name, config: passed to ``wandb.init``.
        resume_step: on resume, records with ``step`` greater than this are dropped from the file
            first (they belong to the interrupted part that is being redone).
    """

    def __init__(self, metrics_path: str | Path, *, enabled: bool = True, wandb_mode: str | None = None,
                 project: str = "mutdet", name: str | None = None, config: Mapping | None = None,
                 resume_step: int | None = None):
        self.path = Path(metrics_path)
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                log.warning("wandb is not installed: metrics go to %s only", self.path)
            else:
                self.run = wandb.init(project=project, name=name, mode=mode, dir=str(self.path.parent),
                                      config=dict(config or {}), resume="allow")

    def log(self, record: Mapping) -> None:
        """Write one record (a flat dict of JSON scalars; ``step`` is used as the wandb step)."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                         step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
