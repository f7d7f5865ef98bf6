"""DDP = one big batch: global batch 2 as 2 gloo ranks x 1 tile vs 1 process x 2 tiles, through the
real :class:`mutdet.engine.trainer.Trainer` (one optimiser step, then a second one).

Compared: the logged loss (ranks averaged by ``dist.reduce_mean``), every gradient as the optimiser
sees it (DDP averages the ranks' gradients), and the parameters after the steps (those whose
gradients are not float noise around zero, see :func:`_compare`).

DETR losses are divided by the number of target boxes: :class:`mutdet.losses.criterion.SetCriterion`
all-reduces the count and divides by ``sum_r n_r / world_size`` (DETR's normalisation), so the DDP
step equals the single-process step both when every rank holds as many boxes and when they differ.
"""
from __future__ import annotations

import os
import socket

import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from mutdet.engine import dist
from mutdet.engine.tracking import read_jsonl

TINY = dict(backbone="light", frozen_stages=-1, frozen_bn=False, embed_dim=32, num_heads=4, num_levels=2,
            num_points=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, dropout=0.0, num_queries=10,
            num_denoising_queries=0, norm_groups=8)  # no dropout / denoising noise: no per-process randomness


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(folder: str, out_dir: str, batch_size: int) -> dict:
    """Two optimiser steps of the real Trainer; gradients recorded at every step."""
    from mutdet.data.datasets import TileDataset
    from mutdet.data.transforms import build_transforms
    from mutdet.engine.trainer import TrainConfig, Trainer
    from mutdet.losses import build_criterion
    from mutdet.models import build_detector
    from test_data_datasets import CLASSES

    torch.manual_seed(0)
    model = build_detector(num_classes=len(CLASSES), **TINY)
    criterion = build_criterion(num_classes=len(CLASSES), num_decoder_layers=1)
    dataset = TileDataset(folder, transform=build_transforms(train=True, input_size=64), skip_empty=False)
    config = TrainConfig(epochs=2, batch_size=batch_size, lr=1e-3, warmup_iterations=2, lr_decay_epochs=(5,),
                         num_workers=0, log_every=1, checkpoint_every_epochs=10, progress=False, seed=3)
    trainer = Trainer(model=model, criterion=criterion, dataset=dataset, config=config, out_dir=out_dir,
                      device=torch.device("cpu"))
    grads = []
    step = trainer._optimizer_step

    def recording_step():
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for p in trainer.model.parameters()])
        step()

    trainer._optimizer_step = recording_step
    result = trainer.fit()
    assert result["step"] == 2
    return {"grads": grads, "params": [p.detach().clone() for p in trainer.model.parameters()],
            "losses": [r["loss"] for r in read_jsonl(f"{out_dir}/metrics.jsonl")] if dist.is_main_process() else None}


def _worker(rank: int, world: int, port: int, folder: str, out_dir: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    dist.init_distributed(torch.device("cpu"))
    try:
        results[rank] = _train(folder, out_dir, batch_size=1)
    finally:
        torch.distributed.destroy_process_group()


def _two_tiles(tmp_path, equal: bool):
    """Two single-tile images (global batch 2) whose box counts are equal or not."""
    from test_data_datasets import make_tiles_folder

    for seed in range(50):
        folder = make_tiles_folder(tmp_path / f"tiles-{seed}", {"a": 1, "b": 1}, seed=seed)
        counts = pq.read_table(folder / "objects.parquet").column("tile_id").value_counts().to_pylist()
        n = sorted(c["counts"] for c in counts)
        if len(n) == 2 and (n[0] == n[1]) == equal:
            return folder, n
    raise AssertionError("no suitable seed")


def _compare(tmp_path, equal: bool):
    folder, counts = _two_tiles(tmp_path, equal)
    torch.set_num_threads(1)
    single = _train(str(folder), str(tmp_path / "single"), batch_size=2)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path / "ddp"), results), nprocs=2,
             join=True)
    ddp = results[0]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # ranks in sync
    assert len(single["losses"]) == len(ddp["losses"]) == 2, counts
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-6)
    for step in range(2):
        for g_ddp, g_single in zip(ddp["grads"][step], single["grads"][step]):
            torch.testing.assert_close(g_ddp, g_single, rtol=1e-3, atol=1e-6)
    # AdamW's first steps move each weight by about lr * sign(gradient): a gradient that is float noise
    # around 0 (|g| < 1e-5 here) may flip sign between the two runs, so those weights are left out.
    checked = total = 0
    for p_ddp, p_single, g0, g1 in zip(ddp["params"], single["params"], *single["grads"]):
        sure = (g0.abs() > 1e-5) & (g1.abs() > 1e-5)
        torch.testing.assert_close(p_ddp[sure], p_single[sure], rtol=1e-4, atol=2e-6)
        checked, total = checked + int(sure.sum()), total + sure.numel()
    assert checked > 0.5 * total, (checked, total)


def test_ddp_step_equals_single_process_batch(tmp_path):
    _compare(tmp_path, equal=True)


def test_ddp_with_unequal_box_counts_equals_single_process(tmp_path):
    _compare(tmp_path, equal=False)
