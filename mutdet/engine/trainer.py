"""The training loop: short enough to read in one sitting (nanoGPT-style), DETR-style stop on a
non-finite loss.

One optimiser step per ``accumulation_steps`` micro-batches (the last, shorter group of an epoch
steps too). Per step: forward (bf16 autocast on CUDA only) -> criterion (fp32) -> weighted sum with
``criterion.weight_dict`` -> backward -> L2 grad clip -> AdamW step -> lr schedule step.

Exact resume: the data order is a permutation seeded by ``(seed, epoch)``, augmentation draws from
a ``random.Random`` seeded by ``(seed, epoch, index)`` (see :class:`SeededItems`), the DataLoader
gets its own generator (it never touches the global RNG), and the checkpoint stores the global RNG
states (dropout, denoising noise). A run resumed from ``<out_dir>/checkpoints/last.pt`` therefore
computes the same losses and parameters as an uninterrupted one (up to float non-determinism of the
device).

Resume only what this run would have computed: ``last.pt`` stores a **resume key**, a SHA-256 of
everything that determines the training state (the stage's ``resume_key``: model, loss, data and
their input files' content, the initialisation checkpoint's content, the code version; the training
settings that change the trajectory; the DDP world size). Settings that only change logging,
checkpoint frequency, data-loading speed or the run's length (:data:`STATE_FREE_FIELDS`) are not part
of it: a longer schedule continues a finished shorter one. A ``last.pt`` with another key (a changed
config, input or code; or one written before keys existed), past the run's last step, or that
cannot be read is moved to ``checkpoints/stale/`` with its ``metrics.jsonl``, and training
starts from step 0, saying why in the log: it never resumes stale weights and never crashes on them.

Files (rank 0 only): ``<out_dir>/checkpoints/last.pt`` (resume state, every
``checkpoint_every_iterations`` steps and/or ``checkpoint_every_epochs`` epochs, and at the end),
``<out_dir>/metrics.jsonl`` (one line per logged step: ``epoch``, ``step``, ``lr``, ``loss`` (the
weighted total) and every unweighted loss term, averaged over the step's micro-batches and ranks).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mutdet.data.datasets import collate
from mutdet.engine import dist
from mutdet.engine.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from mutdet.engine.optim import LOW_LR_NAMES, build_optimizer, build_scheduler
from mutdet.engine.tracking import Tracker

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "EpochSampler", "SeededItems", "move_targets",
           "STATE_FREE_FIELDS", "resume_key_digest"]

log = logging.getLogger("mutdet")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: the paper's fine-tuning recipe, batch 2 per GPU).

    ``max_iterations`` caps the total optimiser steps (None: ``epochs`` full epochs);
    ``lr_decay_epochs`` are converted to iterations with the number of steps per epoch.
    ``amp``: ``auto`` (bf16 autocast on CUDA, none on CPU), ``bf16`` (CUDA only) or ``none``.
    ``lr_reference_batch``: None uses ``lr`` as given; ``N`` scales it linearly by the global batch
    (``batch_size x accumulation_steps x`` DDP world size) over ``N`` (e.g. the paper's lr 1e-4 is for
    a global batch of 8: ``lr_reference_batch: 8`` keeps its per-image rate on any number of GPUs).
    ``compile``: run the training forward through ``torch.compile`` (the model as wrapped for DDP; the
    checkpointed ``model`` and its state-dict keys are unchanged, and evaluation runs uncompiled). The
    first steps are slow (compilation, and a recompilation when shapes change); off by default.
    ``attention_kernel``: ``torch`` (the pure-PyTorch deformable attention) or ``triton`` (the fused Triton
    kernel, :mod:`mutdet.models.ms_deform_attn_triton`, for CUDA runs; CPU runs keep the torch version).
    ``triton`` is not yet confirmed on a GPU, hence off by default. Both change speed, not the function
    computed (only float rounding), so they are not part of the resume key (:data:`STATE_FREE_FIELDS`).
    """

    epochs: int = 36
    max_iterations: int | None = None
    batch_size: int = 2
    accumulation_steps: int = 1
    lr: float = 1e-4
    lr_reference_batch: int | None = None
    weight_decay: float = 1e-5
    lr_multiplier: float = 0.1
    low_lr_names: tuple[str, ...] = LOW_LR_NAMES
    warmup_iterations: int = 500
    warmup_ratio: float = 1 / 3
    lr_decay_epochs: tuple[int, ...] = (32,)
    lr_decay_gamma: float = 0.1
    grad_clip: float = 35.0
    num_workers: int = 2
    log_every: int = 20
    checkpoint_every_iterations: int = 0
    checkpoint_every_epochs: int = 1
    amp: str = "auto"
    seed: int = 0
    progress: bool = True
    compile: bool = False
    attention_kernel: str = "torch"

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "TrainConfig":
        """Build from a config dict; unknown keys raise naming them."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        for key in ("low_lr_names", "lr_decay_epochs"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


# TrainConfig fields that do not change the weights a run computes at a given step: the data order and
# augmentation are seeded independently of workers; logging and checkpoint frequency only decide what
# is written; the length (epochs, max_iterations) only decides where a run stops, so a state at step s
# is the prefix of any run of s steps or more (the lr milestones are their own field, lr_decay_epochs);
# compiling the step or fusing the deformable attention changes the speed and the float rounding only.
STATE_FREE_FIELDS = ("num_workers", "log_every", "checkpoint_every_iterations", "checkpoint_every_epochs",
                     "progress", "epochs", "max_iterations", "compile", "attention_kernel")


def resume_key_digest(values: Mapping) -> str:
    """SHA-256 (hex) of a JSON-like mapping, key order ignored: the identity of a training state."""
    text = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the term(s), the step and the last good checkpoint."""


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by ``(seed, epoch)`` (or ``0..n-1``), this rank's
    share (``rank::world_size``, padded by wrapping so all ranks see as many), from ``start`` on."""

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world_size)
        order = (order * self.world_size)[:per_rank * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, math.ceil(self.size / self.world_size) - self.start)


class SeededItems(Dataset):
    """Wrap a dataset whose ``transform`` accepts ``generator=``: item ``i`` of epoch ``e`` draws its
    augmentation from ``random.Random(f"{seed}-{e}-{i}")`` -- the same in every process and on resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.__getitem__(index, generator=random.Random(f"{self.seed}-{self.epoch}-{index}"))


def move_targets(targets: Sequence[Mapping], device: torch.device) -> list[dict]:
    """Tensors of each target dict to ``device`` (other values unchanged)."""
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def _float32(x):
    """Outputs of a bf16/fp16 forward up to fp32 for the criterion (dicts, lists, tensors); fp32 and
    fp64 outputs pass unchanged (a float64 model keeps float64 losses)."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float32(v) for v in x)
    return x


class Trainer:
    """Train ``model`` with ``criterion`` on ``dataset``.

    Args:
        model: the detector (``model(images, targets, padding_mask=...)`` -> output dict).
        criterion: returns a dict of unweighted scalar losses; its ``weight_dict`` weights them
            (losses without a weight are logged but not optimised).
        dataset: items ``(image, target)``; if it accepts ``generator=`` in ``__getitem__`` the
            augmentation is made resumable (:class:`SeededItems`).
        config: :class:`TrainConfig`.
        out_dir: where ``checkpoints/`` and ``metrics.jsonl`` go.
        device: torch device of this process.
        run_config: the resolved configuration stored in checkpoints (JSON-like).
        resume_key: JSON-like description of everything besides ``config`` that determines the
            training state (see the module docstring); default: ``run_config`` without ``train``.
        wandb_mode: see :mod:`mutdet.engine.tracking`.
        collate_fn: batch builder returning ``(images, padding_mask, targets)``.
    """

    def __init__(self, *, model: nn.Module, criterion: nn.Module, dataset: Dataset, config: TrainConfig,
                 out_dir: str | Path, device: torch.device, run_config: Mapping | None = None,
                 resume_key: Mapping | None = None, wandb_mode: str | None = None, collate_fn: Callable = collate):
        self.config, self.device = config, device
        self.out_dir = Path(out_dir)
        self.last_path = self.out_dir / "checkpoints" / "last.pt"
        self.run_config = dict(run_config or {})
        if resume_key is None:
            resume_key = {k: v for k, v in self.run_config.items() if k != "train"}
        self.run_config.setdefault("train", asdict(config))
        self.resume_key = resume_key_digest({
            "run": resume_key, "world_size": dist.get_world_size(),
            "train": {k: v for k, v in asdict(config).items() if k not in STATE_FREE_FIELDS}})
        self.wandb_mode = wandb_mode
        self.model = model.to(device)
        self.criterion = criterion.to(device)
        self.global_batch = config.batch_size * config.accumulation_steps * dist.get_world_size()
        self.lr = config.lr * (self.global_batch / config.lr_reference_batch if config.lr_reference_batch else 1.0)
        if config.lr_reference_batch:
            log.info("lr %g for a global batch of %d (lr %g at the reference batch %d)", self.lr, self.global_batch,
                     config.lr, config.lr_reference_batch)
        self.optimizer = build_optimizer(model, lr=self.lr, weight_decay=config.weight_decay,
                                         lr_multiplier=config.lr_multiplier, low_lr_names=config.low_lr_names)
        seeded = "generator" in inspect.signature(dataset.__getitem__).parameters
        self.items = SeededItems(dataset, config.seed) if seeded else dataset
        self.sampler = EpochSampler(len(dataset), seed=config.seed, rank=dist.get_rank(),
                                    world_size=dist.get_world_size())
        self.loader = DataLoader(self.items, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=config.num_workers, collate_fn=collate_fn,
                                 generator=torch.Generator(), pin_memory=device.type == "cuda")
        batches = math.ceil(math.ceil(len(dataset) / dist.get_world_size()) / config.batch_size)
        self.steps_per_epoch = math.ceil(batches / config.accumulation_steps)
        if self.steps_per_epoch == 0:
            raise ValueError("Trainer: the training set is empty")
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_iterations is not None:
            self.total_steps = min(self.total_steps, config.max_iterations) if config.epochs else config.max_iterations
        self.scheduler = build_scheduler(self.optimizer, warmup_iterations=config.warmup_iterations,
                                         warmup_ratio=config.warmup_ratio, gamma=config.lr_decay_gamma,
                                         milestones=[e * self.steps_per_epoch for e in config.lr_decay_epochs])
        if config.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp: {config.amp!r} (expected auto | bf16 | none)")
        if config.amp == "bf16" and device.type != "cuda":
            raise ValueError("amp: bf16 autocast is for CUDA runs only")
        self.autocast = device.type == "cuda" and config.amp != "none"
        if config.attention_kernel != "torch":
            from mutdet.models.deformable_attention import set_attention_kernel

            count = set_attention_kernel(self.model, config.attention_kernel)  # raises on an unknown name
            log.info("deformable attention: %s kernel in %d modules%s", config.attention_kernel, count,
                     "" if device.type == "cuda" else " (CUDA only: this CPU run keeps the torch version)")
        self.wrapped = dist.wrap_model(self.model, device)
        if config.compile:
            self.wrapped = torch.compile(self.wrapped)  # self.model (saved, evaluated) stays uncompiled
        self.epoch, self.batch, self.step = 0, 0, 0

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, path: Path | None = None, finished: bool = False) -> None:
        if dist.is_main_process():
            save_checkpoint(path or self.last_path, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, epoch=self.epoch, batch=self.batch, step=self.step,
                            config=self.run_config, meta={"finished": finished, "total_steps": self.total_steps,
                                                          "resume_key": self.resume_key})
        dist.barrier()

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the training state from ``path`` (default ``checkpoints/last.pt``) if it was made by
        this run (same resume key); False if absent. A stale or unreadable file is set aside
        (:meth:`_set_aside`) and False returned: training starts fresh."""
        path = Path(path) if path is not None else self.last_path
        exists, ckpt, found, why = path.is_file(), None, None, None
        if exists:
            try:
                ckpt = load_checkpoint(path, map_location=self.device)
            except Exception as exc:  # noqa: BLE001 -- any unreadable file is set aside, never resumed
                why = f"it cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
            else:
                found = (ckpt.get("meta") or {}).get("resume_key")
                if found != self.resume_key:
                    why = (f"it was made by other settings, inputs or code (resume key "
                           f"{str(found)[:12] if found else 'none'}, this run {self.resume_key[:12]})")
                elif int(ckpt["step"]) > self.total_steps:
                    why = f"it is at step {ckpt['step']}, past this run's last step {self.total_steps}"
        dist.barrier()  # every rank has decided before rank 0 moves anything
        if not exists:
            return False
        if why is not None:
            self._set_aside(path, found, why)
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, self.epoch, self.batch, self.step)
        return True

    def _set_aside(self, path: Path, key: str | None, why: str) -> None:
        """Move a stale ``last.pt`` and the run's ``metrics.jsonl`` to ``checkpoints/stale/`` (nothing
        computed is deleted; a later stale state of the same key replaces it) and log why."""
        stale = self.last_path.parent / "stale"
        tag = str(key or "unkeyed")[:12]
        if dist.is_main_process():
            stale.mkdir(parents=True, exist_ok=True)
            path.replace(stale / f"last-{tag}.pt")
            metrics = self.out_dir / "metrics.jsonl"
            if metrics.is_file():
                metrics.replace(stale / f"metrics-{tag}.jsonl")
        dist.barrier()
        log.warning("not resuming from %s: %s; it is kept in %s and training starts from step 0", path, why, stale)

    # -- one optimiser step --------------------------------------------------------------------------
    def _micro_step(self, images, padding_mask, targets, scale: float, sync: bool) -> dict[str, float]:
        images = images.to(self.device, non_blocking=True)
        padding_mask = padding_mask.to(self.device, non_blocking=True)
        targets = move_targets(targets, self.device)
        sync_ctx = contextlib.nullcontext() if sync or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
        with sync_ctx:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                outputs = self.wrapped(images, targets, padding_mask=padding_mask)
            losses = self.criterion(_float32(outputs), targets)
            weights = self.criterion.weight_dict
            loss = sum(losses[k] * weights[k] for k in losses if k in weights)
            if not dist.all_ranks_true(bool(torch.isfinite(loss)), self.device):  # every rank stops together
                bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v)}
                if torch.isfinite(loss):
                    bad = {"(on another rank)": float("nan")}
                elif not bad:
                    bad = {"loss (weighted sum)": float(loss.detach())}
                raise NonFiniteLossError(
                    f"non-finite loss {bad} at epoch {self.epoch}, "
                    f"step {self.step + 1}; training stopped, the last good checkpoint "
                    f"is {self.last_path if self.last_path.is_file() else 'none (none was written yet)'}")
            (loss * scale).backward()
        values = torch.stack([loss.detach(), *(v.detach().float() for v in losses.values())]).tolist()  # one sync
        return dict(zip(["loss", *losses], values))

    def _optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, *, resume: bool = True, stop_after: int | None = None) -> dict:
        """Train until ``total_steps`` (or ``stop_after`` steps of this call: an interruption, for tests).

        Returns ``{"step", "epoch", "finished", "last_record"}``.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        resumed = self.resume() if resume else False
        tracker = Tracker(self.out_dir / "metrics.jsonl", enabled=dist.is_main_process(), wandb_mode=self.wandb_mode,
                          name=self.out_dir.name, config=self.run_config, resume_step=self.step if resumed else None)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and dist.is_main_process()),
                   dynamic_ncols=True, desc="train",
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a job log gets a line every 30 s
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        done_here, record = 0, None
        try:
            while self.step < self.total_steps and (stop_after is None or done_here < stop_after):
                self.sampler.epoch = self.epoch
                self.sampler.start = self.batch * cfg.batch_size
                if isinstance(self.items, SeededItems):
                    self.items.epoch = self.epoch
                batches = iter(self.loader)
                remaining = len(self.loader)
                while remaining > 0 and self.step < self.total_steps and (stop_after is None or done_here < stop_after):
                    group = min(cfg.accumulation_steps, remaining)
                    sums: dict[str, float] = {}
                    for k in range(group):
                        images, mask, targets = next(batches)
                        values = self._micro_step(images, mask, targets, 1.0 / group, sync=k == group - 1)
                        for key, v in values.items():
                            sums[key] = sums.get(key, 0.0) + v / group
                    remaining -= group
                    self.batch += group
                    lr = self.optimizer.param_groups[0]["lr"]
                    self._optimizer_step()
                    self.step += 1
                    done_here += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums['loss']:.3f}", epoch=self.epoch)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps or self.step == 1:
                        record = {"epoch": self.epoch, "step": self.step, "lr": lr, "time": time.time(),
                                  **dist.reduce_mean(sums, self.device)}
                        tracker.log(record)
                    if remaining == 0:
                        self.epoch, self.batch = self.epoch + 1, 0
                        if cfg.checkpoint_every_epochs and self.epoch % cfg.checkpoint_every_epochs == 0:
                            self.save()
                    elif cfg.checkpoint_every_iterations and self.step % cfg.checkpoint_every_iterations == 0:
                        self.save()
                del batches
            finished = self.step >= self.total_steps
            self.save(finished=finished)
        finally:
            bar.close()
            tracker.close()
        return {"step": self.step, "epoch": self.epoch, "finished": finished, "last_record": record}
