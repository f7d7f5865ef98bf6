"""Stage pretrain end to end on tiny artefacts: the proposal dataset and its join checks, training +
resume, the checkpoint, transfer into a fine-tuning detector (key sets, refused shapes), loss curves."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from mutdet.config import from_dict
from mutdet.data.pretrain import ProposalTileDataset
from mutdet.embedding.artefacts import vector_column, write_targets
from mutdet.engine.checkpoint import load_checkpoint
from mutdet.engine.tracking import read_jsonl
from mutdet.engine.transfer import TransferError, load_pretrained, transfer_state_dict
from mutdet.io.artefacts import read_artefact, write_artefact
from mutdet.models import build_detector
from mutdet.stages import pretrain, tile
from mutdet.stages.loss_curves import plot_loss_curves, read_metrics
from tests.test_finetune import CLASSES, TINY, write_dota

DIM = TINY["embed_dim"]
K = 3
TRAIN = dict(max_iterations=2, batch_size=2, lr=1e-4, warmup_iterations=1, lr_decay_epochs=[],
             num_workers=0, log_every=1, checkpoint_every_iterations=1, progress=False)
SMALL = {"enhancement": {"num_layers": 1, "num_heads": 4, "mlp_dim": 32}, "encoder_head_hidden": 32}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """Tiles of 3 images; proposals = the tiles' objects in reverse order (+ a far-off box), best first;
    targets: unit vectors whose first component encodes (tile, rank), pseudo-class = rank % K."""
    tmp = tmp_path_factory.mktemp("pretrain")
    root = tmp / "data"
    write_dota(root, ["a", "b", "c", "d"])
    cfg = from_dict({"results": str(tmp / "results"), "datasets": {"d": {
        "root": str(root), "format": "dota", "classes": CLASSES, "tiling": {"size": 64, "gap": 16},
        "splits": {"train": {"list": "train.txt"}, "test": {"list": "test.txt"}}}}})
    tile.run(cfg, dataset="d", split="train", shard=0, out_dir=tmp / "tiles")
    objects = read_artefact(tmp / "tiles" / "objects.parquet", "objects").to_pydict()
    rows = {k: [] for k in ("tile_id", "proposal_index", "cx", "cy", "w", "h", "theta", "polygon")}
    by_tile: dict[str, list[int]] = {}
    for i, t in enumerate(objects["tile_id"]):
        by_tile.setdefault(t, []).append(i)
    for t, idx in sorted(by_tile.items()):
        boxes = [[objects[c][i] for c in ("cx", "cy", "w", "h", "theta")] for i in reversed(idx)]
        boxes.append([5.0, 5.0, 6.0, 4.0, 0.0])
        for rank, box in enumerate(boxes):
            rows["tile_id"].append(t)
            rows["proposal_index"].append(rank)
            for c, v in zip(("cx", "cy", "w", "h", "theta"), box):
                rows[c].append(float(v))
            rows["polygon"].append([0.0] * 8)
    n = len(rows["tile_id"])
    table = pa.table({**rows, "score": pa.array(np.linspace(1, 0, n), pa.float32()),
                      "predicted_iou": pa.array([None] * n, pa.float32()),
                      "stability_score": pa.array([None] * n, pa.float32()),
                      "area": pa.array(np.ones(n), pa.float32()), "method": ["test"] * n})
    table = table.take(pa.array(np.random.default_rng(0).permutation(n)))  # file order is not tile order
    write_artefact(table, tmp / "proposals.parquet", "proposals")
    proposals = read_artefact(tmp / "proposals.parquet", "proposals")
    ranks = proposals.column("proposal_index").to_numpy()
    vectors = np.random.default_rng(1).standard_normal((n, DIM))
    vectors[:, 0] = ranks * 10.0  # recognisable after normalisation: rank 0 has a zero first component
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    targets = pa.table({"tile_id": proposals.column("tile_id"), "proposal_index": proposals.column("proposal_index"),
                        "embedding": vector_column(vectors), "cluster_id": pa.array(ranks % K, pa.int16()),
                        "norm": pa.array(np.linspace(0.5, 2.0, n), pa.float32())})  # the L1 target's scale
    write_targets(targets, tmp / "targets.parquet", {"dim": DIM, "params": {"k": K}})
    return {"tmp": tmp, "tiles": tmp / "tiles", "proposals": tmp / "proposals.parquet",
            "targets": tmp / "targets.parquet", "by_tile": by_tile}


def test_dataset_joins_proposals_and_targets_in_rank_order(artefacts):
    ds = ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [artefacts["targets"]])
    assert sorted(ds.tile_ids) == sorted(artefacts["by_tile"]) and ds.num_classes == K and ds.dim == DIM
    image, target = ds[0]
    n = len(artefacts["by_tile"][ds.tile_ids[0]]) + 1
    assert image.dtype == torch.uint8 and target["boxes"].shape == (n, 5) and target["embeddings"].shape == (n, DIM)
    assert target["labels"].tolist() == [r % K for r in range(n)]
    assert target["embeddings"][0, 0].abs() < 0.01 < target["embeddings"][1, 0]  # rank 0 first, then rank 1
    assert target["boxes"][-1].tolist() == pytest.approx([5.0, 5.0, 6.0, 4.0, 0.0])  # the added box is last
    agnostic = ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [artefacts["targets"]],
                                   class_agnostic=True, max_boxes=1)
    _, target = agnostic[0]
    assert agnostic.num_classes == 1 and target["labels"].tolist() == [0] and len(target["embeddings"]) == 1


def test_dataset_refuses_targets_of_other_proposals(artefacts, tmp_path):
    from mutdet.embedding.artefacts import read_targets

    targets = read_targets(artefacts["targets"])
    write_targets(targets.slice(1), tmp_path / "short.parquet", {"dim": DIM})
    with pytest.raises(ValueError, match="short.parquet.*not those of.*proposals.parquet"):
        ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [tmp_path / "short.parquet"])
    with pytest.raises(ValueError, match="as many tiles folders"):
        ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [])


def pretrain_config(variant="mutdet", **train):
    return from_dict({"finetune": {"model": TINY}, "pretrain": {
        "variants": {"detreg": {}, "mutdet": {}}, "epochs": 1, "input_size": 64, "device": "cpu", "train": {**TRAIN, **train},
        **SMALL}})


def _run(artefacts, out, variant="mutdet", **train):
    return pretrain.run(pretrain_config(variant, **train), variant=variant, tiles_dirs=[artefacts["tiles"]],
                        proposals_files=[artefacts["proposals"]], targets_files=[artefacts["targets"]], out_dir=out)


def test_pretrain_mutdet_resume_checkpoint_and_transfer(artefacts, tmp_path):
    out = tmp_path / "mutdet"
    result = _run(artefacts, out)
    assert result["train"]["step"] == 2 and result["train"]["finished"]
    records = read_jsonl(out / "metrics.jsonl")
    assert {"loss_align", "loss_align_enc", "loss_align_dn", "loss_cls_siam", "align_pos_cosine"} <= set(records[-1])
    assert (out / "loss_curves.png").stat().st_size > 0
    config = json.loads((out / "config.json").read_text())
    assert config["variant"]["siamese"] is True and config["num_classes"] == K
    # rerun with a longer schedule resumes from checkpoints/last.pt
    again = _run(artefacts, out, max_iterations=3)
    assert again["train"]["step"] == 3
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["meta"]["kind"] == "pretrain" and ckpt["meta"]["variant"] == "mutdet"
    keys = set(ckpt["model"])
    assert any(k.startswith("mutual_enhancement.") for k in keys)
    assert any(k.startswith("encoder_embedding_head.") for k in keys)
    assert "detector.class_heads.0.weight" in keys and ckpt["model"]["detector.class_heads.0.weight"].shape[0] == K

    torch.manual_seed(5)
    ft = build_detector(num_classes=len(CLASSES), **TINY)
    fresh = {k: v.clone() for k, v in ft.state_dict().items()}
    report = load_pretrained(ft, out / "checkpoint.pt")
    detector_keys = {k[len("detector."):] for k in keys if k.startswith("detector.")}
    pretraining_only = {k for k in keys if not k.startswith("detector.")}
    expected_new = {k for k in ft.state_dict() if k.startswith(("class_heads.", "label_embed."))}
    assert set(report["missing"]) == expected_new
    assert set(report["loaded"]) == detector_keys - expected_new
    assert set(report["dropped"]) == pretraining_only | expected_new
    assert set(report["dropped"].values()) == {"pretraining-only"}
    state = ft.state_dict()
    torch.testing.assert_close(state["query_embed.weight"], ckpt["model"]["detector.query_embed.weight"])
    torch.testing.assert_close(state["class_heads.0.weight"], fresh["class_heads.0.weight"])  # newly initialised
    assert report["variant"] == "mutdet"

    wider = build_detector(num_classes=2, **{**TINY, "ffn_dim": 48})
    with pytest.raises(TransferError, match=r"ffn.*\(64, 32\) in the checkpoint, \(48, 32\) in the model"):
        load_pretrained(wider, out / "checkpoint.pt")
    # the old checkpoint is untouched by a refused load, and a bare detector state dict works too
    kept, bare = transfer_state_dict({k[len("detector."):]: v for k, v in ckpt["model"].items()
                                      if k.startswith("detector.")}, ft.state_dict())
    assert set(bare["loaded"]) == set(report["loaded"])


def test_pretrain_detreg_is_class_agnostic(artefacts, tmp_path):
    out = tmp_path / "detreg"
    _run(artefacts, out, variant="detreg", max_iterations=1)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["model"]["detector.class_heads.0.weight"].shape[0] == 1
    assert not any(k.startswith(("mutual_enhancement.", "encoder_embedding_head.")) for k in ckpt["model"])
    record = read_jsonl(out / "metrics.jsonl")[-1]
    assert "loss_align" in record and "loss_align_dn" not in record and "loss_cls_siam" not in record


def test_loss_curves_png_and_bad_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss_cls": 1.0 / s, "loss_l1": 0.5, "loss_giou": 0.2,
                                       "loss_align": 2.0 - s / 10, "loss_angle": 0.3}) + "\n" for s in range(1, 9)))
    png = plot_loss_curves({"with": log, "without": log}, tmp_path / "curves.png", title="t")
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 100
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_metrics(bad)


def test_cli_rejects_unknown_variant(tmp_path, caplog):
    from mutdet.cli import main

    code = main(["pretrain", "--config", "{}", "--variant", "mutdett", "--tiles", str(tmp_path),
                 "--proposals", str(tmp_path / "p"), "--targets", str(tmp_path / "t"), "--out", str(tmp_path / "o")])
    assert code == 2 and "pretrain.variants: no variant named 'mutdett' (have ['detreg', 'mutdet'])" in caplog.text


def test_dataset_keeps_in_memory_only_the_proposals_items_use(artefacts):
    """With max_boxes, the rows past the best max_boxes of a tile are dropped when the shard is read
    (memory follows what the items use), and every item is the same as without the cut."""
    full = ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [artefacts["targets"]])
    cut = ProposalTileDataset([artefacts["tiles"]], [artefacts["proposals"]], [artefacts["targets"]], max_boxes=1)
    assert len(cut.records) == len(artefacts["by_tile"])  # one row per tile
    assert len(cut.records) < len(full.records)
    assert cut.records.dtype.itemsize == 26 + 2 * DIM  # box, label, norm, float16 vector: nothing else
    for index in range(len(full)):
        _, a = full[index]
        _, b = cut[index]
        for key in ("labels", "boxes", "embeddings", "embedding_norms"):
            torch.testing.assert_close(b[key], a[key][:1], rtol=0, atol=0)


def test_dataset_memory_maps_one_shared_array(artefacts, tmp_path, monkeypatch):
    """With a cache folder the kept proposals are one .npy, memory-mapped read-only; a second dataset
    (another rank) maps the same file without rebuilding it; pickling (spawned workers) does not copy it;
    other inputs or another max_boxes make another key and remove the old file."""
    import pickle

    from mutdet.data import pretrain as data_pretrain

    files = ([artefacts["tiles"]], [artefacts["proposals"]], [artefacts["targets"]])
    memory = ProposalTileDataset(*files, max_boxes=2)
    mapped = ProposalTileDataset(*files, max_boxes=2, cache_dir=tmp_path / "cache")
    assert isinstance(mapped.records, np.memmap) and not mapped.records.flags.writeable
    assert mapped.cache_file.parent == tmp_path / "cache" and mapped.cache_file.suffix == ".npy"
    assert mapped.cache_file.stat().st_size < len(mapped.records) * (26 + 2 * DIM) + 4096
    np.testing.assert_array_equal(np.asarray(mapped.records), memory.records)
    assert mapped.tile_ids == memory.tile_ids

    def no_build(*args, **kwargs):
        raise AssertionError("the cached array must be reused")

    monkeypatch.setattr(data_pretrain.ProposalTileDataset, "_build", no_build)
    other_rank = ProposalTileDataset(*files, max_boxes=2, cache_dir=tmp_path / "cache")
    assert other_rank.cache_file == mapped.cache_file
    copy = pickle.loads(pickle.dumps(other_rank))
    assert len(pickle.dumps(other_rank)) < mapped.cache_file.stat().st_size
    for index in range(len(memory)):
        _, a = memory[index]
        _, b = copy[index]
        for key in ("labels", "boxes", "embeddings", "embedding_norms"):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    monkeypatch.undo()
    ProposalTileDataset(*files, max_boxes=3, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1 and not mapped.cache_file.exists()


@pytest.mark.parametrize("name", ["dior-r", "dota", "ohd-sjtu"])
def test_paper_configs_cap_the_proposals_per_tile(name):
    """The paper configs set pretrain.max_boxes explicitly (DETReg's 30), not null (up to 1000 a tile)."""
    from pathlib import Path

    from mutdet.config import load_config

    path = Path(__file__).resolve().parents[1] / "config" / "paper" / f"{name}.yaml"
    assert "max_boxes: 30" in path.read_text() and load_config(path).pretrain.max_boxes == 30
