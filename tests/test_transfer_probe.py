"""benchmarks/transfer_probe.py scores what it claims: class-agnostic AP, recall at IoU 0.5 and the
mean best IoU of per-tile boxes against the labelled objects of a tiles folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mutdet.data.datasets import TileDataset
from mutdet.data.transforms import build_transforms
from test_data_datasets import make_tiles_folder

_SPEC = importlib.util.spec_from_file_location(
    "transfer_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "transfer_probe.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


def _gt(dataset: TileDataset, tile_id: str) -> np.ndarray:
    obj = dataset._objects[tile_id]
    return np.stack([obj[k] for k in ("cx", "cy", "w", "h", "theta")], 1).reshape(-1, 5).astype(np.float64)


@pytest.fixture
def dataset(tmp_path):
    return TileDataset(make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 3}, seed=2))


def test_boxes_on_the_objects_score_full_recall_and_ap(dataset):
    dets = {t: (np.linspace(0.9, 0.5, len(_gt(dataset, t))), _gt(dataset, t)) for t in dataset.tile_ids}
    r = probe.score(dets, dataset, top=10)
    assert r["num_objects"] > 0
    assert r["recall50"] == 1.0 and r["AP50"] == pytest.approx(100.0) and r["AP75"] == pytest.approx(100.0)
    assert r["mean_best_iou"] == pytest.approx(1.0, abs=1e-4)  # float32 rotated IoU of identical boxes


def test_boxes_off_the_objects_score_nothing_and_top_limits_recall(dataset):
    far = {t: (np.ones(1), np.array([[1000.0, 1000.0, 5.0, 5.0, 0.0]])) for t in dataset.tile_ids}
    r = probe.score(far, dataset, top=10)
    assert r["recall50"] == 0.0 and r["AP50"] == 0.0 and r["mean_best_iou"] == 0.0
    # the right boxes ranked after a wrong one: top=1 keeps only the wrong one for the recall
    mixed = {t: (np.r_[1.0, np.full(len(_gt(dataset, t)), 0.5)],
                 np.vstack([[[1000.0, 1000.0, 5.0, 5.0, 0.0]], _gt(dataset, t)])) for t in dataset.tile_ids}
    assert probe.score(mixed, dataset, top=1)["recall50"] == 0.0
    assert probe.score(mixed, dataset, top=50)["recall50"] == 1.0


def test_agnostic_detections_keep_one_box_per_query(tmp_path):
    data = TileDataset(make_tiles_folder(tmp_path / "tiles", {"a": 2}, seed=0),
                       transform=build_transforms(train=False, input_size=64))
    model_kwargs = dict(backbone="light", frozen_stages=-1, frozen_bn=False, embed_dim=32, num_heads=4, num_levels=2,
                        num_points=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, dropout=0.0,
                        num_queries=10, num_denoising_queries=0)
    detector = probe.random_detector(model_kwargs, seed=0)
    with torch.no_grad():
        dets = probe.agnostic_detections(detector, data, top=7)
    assert set(dets) == set(data.tile_ids)
    for scores, boxes in dets.values():
        assert scores.shape == (7,) and boxes.shape == (7, 5) and np.all(np.diff(scores) <= 0)
