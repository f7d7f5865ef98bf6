"""Metrics tracking: a JSON-lines file (always) and Weights & Biases (optional, never required).

wandb mode: the ``wandb_mode`` argument if given, else the ``WANDB_MODE`` environment variable, else
``offline`` (runs land in ``<out_dir>/wandb``, no network needed: compute nodes are often offline).
``disabled`` (what the tests use) or a missing ``wandb`` package means JSON lines only. Only rank 0
should build a tracker that writes (the trainer passes ``enabled=False`` elsewhere).

One wandb run per job (per output folder): its id is kept in ``<out_dir>/wandb/mutdet-run-id``; a job
resumed after pre-emption (``resume_step`` given) logs to the same run id, a job started from scratch
gets a new one. Runs of one experiment share a ``group`` (the ``group`` argument, else
``$MUTDET_WANDB_GROUP``, e.g. ``export MUTDET_WANDB_GROUP=mutdet-dota-r50`` before ``snakemake``) so the
wandb UI shows them together; the run's name is ``$MUTDET_WANDB_NAME`` if set (a rule can set it to
its wildcards), else the ``name`` argument. The project is the ``project`` argument, else
``$WANDB_PROJECT``, else ``mutdet``.

Uploading offline runs later (from a machine with network; ``wandb login`` once)::

    wandb sync --append results/finetune/init~none/frac~1.0/epochs~36/seed~42/dota/test/wandb/offline-run-*
    # every run below results/ that is not synced yet:
    find results -type d -name 'offline-run-*' | sort | xargs -r wandb sync --append

``--append`` merges the pieces of a job that was pre-empted and resumed (one offline folder per
attempt, the same run id) into one run; steps already uploaded are skipped by wandb. ``wandb sync``
marks what it uploaded (``--include-synced`` to redo).
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Tracker", "read_jsonl", "resolve_wandb_mode", "wandb_run_id"]

log = logging.getLogger("mutdet")
WANDB_MODES = ("online", "offline", "disabled")


def resolve_wandb_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode {mode!r}: expected one of {WANDB_MODES}")
    return mode


def wandb_run_id(out_dir: str | Path, resume: bool) -> str:
    """The wandb run id of the job writing to ``out_dir``: the stored one when resuming (if any), else a
    new one, stored in ``<out_dir>/wandb/mutdet-run-id``."""
    path = Path(out_dir) / "wandb" / "mutdet-run-id"
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


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
        wandb_mode, project, group, name: see the module docstring. config, job_type, tags: passed to
            ``wandb.init`` (``job_type``, e.g. the stage, filters runs in the UI).
        resume_step: on resume, records with ``step`` greater than this are dropped from the file
            first (they belong to the interrupted part that is being redone).
    """

    def __init__(self, metrics_path: str | Path, *, enabled: bool = True, wandb_mode: str | None = None,
                 project: str | None = None, name: str | None = None, config: Mapping | None = None,
                 resume_step: int | None = None, group: str | None = None, job_type: str | None = None,
                 tags: list[str] | None = None):
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
                run_id = wandb_run_id(self.path.parent, resume=resume_step is not None)
                slurm = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT")
                         if k in os.environ}
                self.run = wandb.init(
                    project=project or os.environ.get("WANDB_PROJECT") or "mutdet",
                    group=group or os.environ.get("MUTDET_WANDB_GROUP") or None,
                    name=os.environ.get("MUTDET_WANDB_NAME") or name, job_type=job_type, tags=tags,
                    id=run_id, mode=mode, dir=str(self.path.parent),
                    config={**dict(config or {}), **({"slurm": slurm} if slurm else {})},
                    # offline runs cannot resume (wandb warns); `wandb sync --append` joins them later
                    resume="allow" if mode == "online" else None)

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
