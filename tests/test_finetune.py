"""Stage finetune end to end: DOTA-format images -> tile stage -> finetune (2-3 iterations) ->
tile and merged detections -> evaluation; rerun resumes; init from a checkpoint."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from mutdet.boxes import le90_to_polygon
from mutdet.config import from_dict
from mutdet.engine.checkpoint import load_checkpoint, save_checkpoint
from mutdet.engine.transfer import transfer_state_dict
from mutdet.engine.tracking import read_jsonl
from mutdet.io.artefacts import read_artefact, read_metadata
from mutdet.stages import evaluate, finetune, merge, tile

CLASSES = ["plane", "ship"]
TINY = dict(backbone="light", frozen_stages=-1, frozen_bn=False, embed_dim=32, num_heads=4, num_levels=2,
            num_points=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, dropout=0.0, num_queries=10,
            num_denoising_queries=6)
TRAIN = dict(max_iterations=3, batch_size=2, lr=1e-4, warmup_iterations=2, lr_decay_epochs=[],
             num_workers=0, log_every=1, checkpoint_every_iterations=2, progress=False)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def write_dota(root, ids):
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    rng = np.random.default_rng(1)
    for image_id in ids:
        img = np.full((96, 112, 3), 30, np.uint8)
        boxes = np.column_stack([[25, 75], rng.uniform(25, 70, 2), [20, 24], [10, 8], rng.uniform(-1.4, 1.4, 2)])
        lines = ["imagesource:test", "gsd:1"]
        for k, poly in enumerate(le90_to_polygon(boxes)):
            cv2.fillPoly(img, [poly.reshape(4, 2).round().astype(np.int32)], (250, 250 - 150 * k, 100))
            lines.append(" ".join(f"{v:.2f}" for v in poly) + f" {CLASSES[k]} 0")
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), img)
        (root / "labelTxt" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "test.txt").write_text("\n".join(ids[3:]) + "\n")


def test_finetune_end_to_end_and_resume(tmp_path):
    root = tmp_path / "data"
    write_dota(root, ["a", "b", "c", "d"])
    def make_config(**train):
        return from_dict({"results": str(tmp_path / "results"), "datasets": {"d": {
            "root": str(root), "format": "dota", "classes": CLASSES, "tiling": {"size": 64, "gap": 16},
            "splits": {"train": {"list": "train.txt"}, "test": {"list": "test.txt"}}}},
            "finetune": {"model": TINY, "train": {**TRAIN, **train}, "input_size": 64, "num_select": 20}})

    cfg = make_config()
    tile.run(cfg, dataset="d", split="train", shard=0, out_dir=tmp_path / "tiles_train")
    tile.run(cfg, dataset="d", split="test", shard=0, out_dir=tmp_path / "tiles_test")
    out = tmp_path / "ft"
    (tmp_path / "subset.txt").write_text("a\nb\n")
    kwargs = dict(dataset="d", epochs=1, tiles_dirs=[tmp_path / "tiles_train"], test_tiles_dirs=[tmp_path / "tiles_test"],
                  image_ids_file=tmp_path / "subset.txt", init="none", out_dir=out)
    result = finetune.run(cfg, **kwargs)
    assert result["train"]["step"] == 3 and result["train"]["finished"]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    params = json.loads((out / "config.json").read_text())
    assert params["image_ids"] == ["a", "b"] and params["classes"] == CLASSES
    assert params["seed"] == cfg.seed == params["train"]["seed"]  # no seed given: the config's top-level one
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["model"]["embed_dim"] == 32 and ckpt["meta"]["finished"]
    assert result["detections"] == out / "detections_tiles.parquet" and not (out / "detections.parquet").exists()
    merge.run(out / "detections_tiles.parquet", [tmp_path / "tiles_test" / "tiles.parquet"], out / "detections.parquet")
    tiles_dets = read_artefact(out / "detections_tiles.parquet", "detections")
    merged = read_artefact(out / "detections.parquet", "detections")
    assert read_metadata(out / "detections_tiles.parquet")["frame"] == "tile"
    assert read_metadata(out / "detections.parquet")["frame"] == "image"
    assert tiles_dets.num_rows > 0 and set(tiles_dets.column("id").to_pylist()) <= set(
        read_artefact(tmp_path / "tiles_test" / "tiles.parquet", "tiles").column("tile_id").to_pylist())
    assert set(merged.column("id").to_pylist()) == {"d"} and 0 < merged.num_rows <= tiles_dets.num_rows
    metrics = evaluate.run(cfg, dataset="d", split="test", out_dir=out, detections=out / "detections.parquet")
    assert metrics["split"] == "test" and "AP50" in metrics["mean"]
    # the checkpoint alone rebuilds the same detector: identical outputs on the same input
    from mutdet.engine.inference import load_detector
    from mutdet.models import build_detector

    rebuilt, config = load_detector(out / "checkpoint.pt", torch.device("cpu"))
    reference = build_detector(num_classes=len(CLASSES), **TINY)
    reference.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    reference.eval()
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = rebuilt(image), reference(image)
    for key in ("pred_logits", "pred_boxes", "pred_angle_logits"):
        torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(a["pred_logits"], build_detector(num_classes=len(CLASSES), **TINY).eval()(image)["pred_logits"])
    # rerun with a longer schedule: resumes at step 3 and continues to 4
    before = (out / "metrics.jsonl").read_text()
    again = finetune.run(make_config(max_iterations=4), **kwargs)
    assert again["train"]["step"] == 4
    assert (out / "metrics.jsonl").read_text().startswith(before)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    # a new initialisation is not hidden by the finished state of the old one: set aside, trained anew
    init = tmp_path / "init.pt"
    save_checkpoint(init, model=build_detector(num_classes=len(CLASSES), **{**TINY, "dropout": 0.0}))
    fresh = finetune.run(cfg, **{**kwargs, "init": init})
    assert fresh["train"]["step"] == 3
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert len(list((out / "checkpoints" / "stale").glob("last-*.pt"))) == 1
    assert not torch.equal(load_checkpoint(out / "checkpoint.pt")["model"]["class_heads.0.weight"],
                           ckpt["model"]["class_heads.0.weight"])
    # another seed of the same cell (finetune.runs[].seeds): the same images, other initial weights
    other = tmp_path / "ft-seed5"
    seeded = finetune.run(cfg, **{**kwargs, "out_dir": other, "seed": 5, "test_tiles_dirs": []})
    assert seeded["train"]["step"] == 3
    params5 = json.loads((other / "config.json").read_text())
    assert params5["seed"] == params5["train"]["seed"] == 5 and params5["image_ids"] == params["image_ids"]
    assert not torch.equal(load_checkpoint(other / "checkpoint.pt")["model"]["class_heads.0.weight"],
                           ckpt["model"]["class_heads.0.weight"])
    with pytest.raises(ValueError, match="seed -1 is negative"):
        finetune.run(cfg, **{**kwargs, "out_dir": tmp_path / "ft-bad", "seed": -1})


def test_init_from_pretrained_checkpoint_reports_dropped_keys(tmp_path):
    from mutdet.models import build_detector

    torch.manual_seed(0)
    pre = build_detector(num_classes=7, **TINY)  # e.g. pseudo-classes
    state = dict(pre.state_dict())
    state["mutual_enhancement.layers.0.weight"] = torch.zeros(3)
    path = save_checkpoint(tmp_path / "pre.pt", model=state, config={"model": TINY})
    torch.manual_seed(1)
    ft = build_detector(num_classes=2, **TINY)
    kept, report = transfer_state_dict(load_checkpoint(path)["model"], ft.state_dict())
    assert report["dropped"]["mutual_enhancement.layers.0.weight"] == "pretraining-only"
    assert report["dropped"]["class_heads.0.weight"] == "pretraining-only"
    assert report["dropped"]["label_embed.weight"] == "pretraining-only"
    assert "class_heads.0.weight" in report["missing"] and "encoder.layers.0.norm.weight" in report["loaded"]
    from mutdet.engine.transfer import load_pretrained

    info = load_pretrained(ft, path)
    torch.testing.assert_close(ft.state_dict()["query_embed.weight"], pre.state_dict()["query_embed.weight"])
    assert info["source"] == str(path)


def test_detect_stage_on_a_large_image(tmp_path):
    from mutdet.engine.checkpoint import save_checkpoint
    from mutdet.io.artefacts import read_artefact
    from mutdet.models import build_detector
    from mutdet.stages import detect

    torch.manual_seed(0)
    model = build_detector(num_classes=2, **TINY)
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", model=model,
                           config={"model": TINY, "classes": CLASSES, "input_size": 64})
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "big.png"), np.full((150, 170, 3), 40, np.uint8))
    cv2.imwrite(str(images / "small.jpg"), np.full((40, 50, 3), 40, np.uint8))
    merged = detect.run(checkpoint=ckpt, images=[images], out_dir=tmp_path / "out", tile_size=64, gap=16,
                        device="cpu", num_select=5, score_threshold=0.0, preview_score=0.0)
    table = read_artefact(tmp_path / "out" / "detections.parquet", "detections")
    assert table.num_rows == merged.num_rows > 0 and set(table.column("id").to_pylist()) <= {"big", "small"}
    big = table.filter(pa_equal(table, "big"))
    cx = np.asarray(big.column("cx"))
    assert cx.max() > 64 and cx.max() <= 170 + 64  # image frame: tiles start at x = 0, 48, 96, 106
    assert sorted(p.name for p in (tmp_path / "out" / "task1").iterdir()) == [f"Task1_{c}.txt" for c in CLASSES]
    preview = cv2.imread(str(tmp_path / "out" / "previews" / "big.png"))
    assert preview.shape == (150, 170, 3) and (preview != 40).any()


def pa_equal(table, value):
    import pyarrow.compute as pc

    return pc.equal(table.column("id"), value)


def _ddp_finetune(rank: int, world: int, port: int, cfg_dict: dict, kwargs: dict) -> None:
    import os

    from mutdet.engine import dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    try:
        finetune.run(from_dict(cfg_dict), **kwargs)
    finally:
        if dist.is_distributed():
            torch.distributed.destroy_process_group()


def test_detection_is_sharded_over_ranks_and_joined_in_tile_order(tmp_path):
    """Under DDP each rank detects every world-size-th test tile; rank 0 joins the shards into the file
    a single process would write with the same weights (tile order, rows, values), and removes them."""
    import socket

    import torch.multiprocessing as mp

    from mutdet.data.datasets import TileDataset
    from mutdet.data.transforms import build_transforms
    from mutdet.engine.inference import load_detector, predict_tiles

    root = tmp_path / "data"
    write_dota(root, ["a", "b", "c", "d", "e"])  # test images d, e: several tiles each
    cfg_dict = {"results": str(tmp_path / "results"), "datasets": {"d": {
        "root": str(root), "format": "dota", "classes": CLASSES, "tiling": {"size": 48, "gap": 8},
        "splits": {"train": {"list": "train.txt"}, "test": {"list": "test.txt"}}}},
        "finetune": {"model": TINY, "train": {**TRAIN, "max_iterations": 2, "batch_size": 1}, "input_size": 48,
                     "num_select": 20, "eval_batch_size": 1}}
    cfg = from_dict(cfg_dict)
    tile.run(cfg, dataset="d", split="train", shard=0, out_dir=tmp_path / "tiles_train")
    tile.run(cfg, dataset="d", split="test", shard=0, out_dir=tmp_path / "tiles_test")
    out = tmp_path / "ft"
    kwargs = dict(dataset="d", epochs=1, tiles_dirs=[tmp_path / "tiles_train"],
                  test_tiles_dirs=[tmp_path / "tiles_test"], image_ids_file=None, init="none", out_dir=out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_finetune, args=(2, port, cfg_dict, kwargs), nprocs=2, join=True)

    test_set = TileDataset([tmp_path / "tiles_test"], transform=build_transforms(train=False, input_size=48))
    assert len(test_set) >= 4  # both ranks had tiles to detect
    joined = read_artefact(out / "detections_tiles.parquet", "detections")
    assert not list(out.glob("*.rank-*"))  # the shards are removed once joined
    model, _ = load_detector(out / "checkpoint.pt", torch.device("cpu"))
    single = predict_tiles(model, test_set, classes=CLASSES, device=torch.device("cpu"), batch_size=1,
                           num_select=20)
    assert joined.num_rows == single.num_rows == 20 * len(test_set)
    assert joined.column("id").to_pylist() == single.column("id").to_pylist()
    for column in ("class_id", "score", "cx", "cy", "w", "h", "theta"):  # batch 1 in both: the same kernels
        np.testing.assert_array_equal(joined.column(column).to_numpy(), single.column(column).to_numpy())


def test_in_tile_order_groups_rows_by_tile_and_keeps_their_order():
    import pyarrow as pa

    table = pa.table({"id": ["t2", "t0", "t2", "t1", "t0"], "score": [0.9, 0.8, 0.7, 0.6, 0.5]})
    ordered = finetune.in_tile_order(table, ["t0", "t1", "t2", "t3"])
    assert ordered.column("id").to_pylist() == ["t0", "t0", "t1", "t2", "t2"]
    assert ordered.column("score").to_pylist() == [0.8, 0.5, 0.6, 0.9, 0.7]
    with pytest.raises(ValueError, match="not in the test set"):
        finetune.in_tile_order(table, ["t0", "t1"])
