"""What the pre-training signal holds, measured on a finished run's artefacts (no training, a few seconds).

Pre-training can only transfer what its targets carry. This reads the stored proposals, targets and
pre-training logs of a results folder and the labels of the tiles the proposals came from (the
labels are never read by pre-training; here they only score its inputs), and prints:

1. **Objectness of the boxes**: the share of proposals that hit an object (rotated IoU >= 0.5 with a
   labelled object of the same tile) and the recall of the objects.
2. **Semantics of the embedding targets** on the proposals that hit an object, whose class is then
   known:
   - adjusted mutual information (AMI) between the pseudo-class (k-means cluster) and the class;
   - 1-nearest-neighbour class accuracy of the target embeddings (cosine; the neighbour from another
     image) against the majority-class rate;
   - mean cosine between target embeddings of two random proposals, of two hits of the same class,
     of two hits of different classes, and of a hit and a background proposal.
   A target space whose same-class and different-class cosines are equal cannot teach classes.
3. **Convergence of pre-training** from each variant's ``metrics.jsonl``: the box losses (GIoU, L1,
   objectness) over the first and the last tenth of the steps, and the mean cosine of the matched and
   of the unmatched query/target pairs (``align_pos_cosine`` / ``align_neg_cosine``) at the end. A
   model whose matched and unmatched cosines are equal has not learned to tell its targets apart.

Usage::

    python benchmarks/pretrain_signal.py --results results --dataset synthetic --splits train
    python benchmarks/pretrain_signal.py --results results-lowdata --dataset synthetic --splits train

Splits without labels (``unlabelled``) cannot be scored and are not accepted. With several proposal
or embedding tags in the folder, pass ``--tag graph-xxxx/resnet18-yyyy`` to choose one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import adjusted_mutual_info_score

from mutdet.boxes import rotated_iou

RNG_SEED = 0


def _one(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise SystemExit(f"expected one {what}, found {len(paths)}: {[str(p) for p in paths]} (pass --tag)")
    return paths[0]


def load_split(results: Path, dataset: str, split: str, tag: str | None) -> dict:
    """Proposals joined to their targets, and the tiles' labelled objects, over every shard of a split."""
    root = results / dataset
    proposal_tag = tag.split("/")[0] if tag else None
    targets_root = _one(sorted((root / "targets").glob(f"{tag}" if tag else "*/*")), "targets folder")
    proposals_root = root / "proposals" / (proposal_tag or targets_root.parent.name)
    rows = {"tile": [], "box": [], "embedding": [], "cluster": []}
    objects = {"tile": [], "box": [], "cls": []}
    shards = sorted((targets_root / split).glob("shard-*"))
    if not shards:
        raise SystemExit(f"no target shards under {targets_root / split}")
    for shard in shards:
        prop = pq.read_table(proposals_root / split / shard.name / "proposals.parquet",
                             columns=["tile_id", "proposal_index", "cx", "cy", "w", "h", "theta"]).to_pandas()
        targ = pq.read_table(shard / "targets.parquet",
                             columns=["tile_id", "proposal_index", "embedding", "cluster_id"]).to_pandas()
        joined = prop.merge(targ, on=["tile_id", "proposal_index"], how="inner", validate="one_to_one")
        rows["tile"].append(joined["tile_id"].to_numpy())
        rows["box"].append(joined[["cx", "cy", "w", "h", "theta"]].to_numpy(np.float64))
        rows["embedding"].append(np.stack(joined["embedding"].to_numpy()).astype(np.float32))
        rows["cluster"].append(joined["cluster_id"].to_numpy())
        obj = pq.read_table(root / "tiles" / split / shard.name / "objects.parquet",
                            columns=["tile_id", "cx", "cy", "w", "h", "theta", "class_name"]).to_pandas()
        objects["tile"].append(obj["tile_id"].to_numpy())
        objects["box"].append(obj[["cx", "cy", "w", "h", "theta"]].to_numpy(np.float64))
        objects["cls"].append(obj["class_name"].to_numpy())
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out.update({f"obj_{k}": np.concatenate(v) for k, v in objects.items()})
    out["targets_root"] = targets_root
    return out


def match(data: dict, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per proposal: the class of the best-overlapping object at IoU >= threshold (None: background);
    per object: whether some proposal hits it."""
    cls = np.full(len(data["tile"]), None, dtype=object)
    covered = np.zeros(len(data["obj_tile"]), dtype=bool)
    by_tile: dict[str, np.ndarray] = {}
    for t in np.unique(data["obj_tile"]):
        by_tile[t] = np.flatnonzero(data["obj_tile"] == t)
    order = np.argsort(data["tile"], kind="stable")
    tiles_sorted = data["tile"][order]
    starts = np.flatnonzero(np.r_[True, tiles_sorted[1:] != tiles_sorted[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
        members = order[start:stop]
        objs = by_tile.get(tiles_sorted[start])
        if objs is None:
            continue
        iou = rotated_iou(data["box"][members], data["obj_box"][objs])  # (P, G)
        best = iou.argmax(axis=1)
        hit = iou.max(axis=1) >= iou_threshold
        cls[members[hit]] = data["obj_cls"][objs[best[hit]]]
        covered[objs[iou.max(axis=0) >= iou_threshold]] = True
    return cls, covered, np.array([c is not None for c in cls])


def cosine_stats(emb: np.ndarray, cls: np.ndarray, hit: np.ndarray, pairs: int = 200_000) -> dict:
    rng = np.random.default_rng(RNG_SEED)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
        if len(a) == 0 or len(b) == 0:
            return float("nan")
        i, j = rng.integers(0, len(a), pairs), rng.integers(0, len(b), pairs)
        keep = a[i] != b[j]
        return float(np.einsum("nd,nd->n", unit[a[i][keep]], unit[b[j][keep]]).mean())

    hits = np.flatnonzero(hit)
    background = np.flatnonzero(~hit)
    same, diff = [], []
    i, j = rng.integers(0, len(hits), pairs), rng.integers(0, len(hits), pairs)
    ok = hits[i] != hits[j]
    c = np.einsum("nd,nd->n", unit[hits[i][ok]], unit[hits[j][ok]])
    equal = cls[hits[i][ok]] == cls[hits[j][ok]]
    same, diff = c[equal], c[~equal]
    everyone = np.arange(len(emb))
    return {"random pair": mean_cos(everyone, everyone),
            "hit, same class": float(same.mean()) if len(same) else float("nan"),
            "hit, other class": float(diff.mean()) if len(diff) else float("nan"),
            "hit vs background": mean_cos(hits, background)}


def knn_accuracy(emb: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """1-NN class accuracy under cosine similarity, the neighbour taken from another image (``groups``):
    proposals of one object in overlapping tiles or at several scales would otherwise find each other."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    correct = 0
    for start in range(0, len(unit), 1024):
        sim = unit[start:start + 1024] @ unit.T
        sim[groups[start:start + 1024, None] == groups[None, :]] = -np.inf
        correct += int((labels[sim.argmax(axis=1)] == labels[start:start + sim.shape[0]]).sum())
    return correct / len(unit)


def convergence(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    tenth = max(len(rows) // 10, 1)
    first, last = rows[:tenth], rows[-tenth:]

    def mean(rs, key):
        vals = [r[key] for r in rs if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    return {"steps": rows[-1]["step"] if rows else 0,
            **{f"{k} first→last": (mean(first, k), mean(last, k)) for k in ("loss_giou", "loss_l1", "loss_cls")},
            "align cosine matched (last)": mean(last, "align_pos_cosine"),
            "align cosine unmatched (last)": mean(last, "align_neg_cosine")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--splits", nargs="+", default=["train"], help="labelled splits of the pre-training pool")
    parser.add_argument("--tag", default=None, help="proposals-tag/embedding-tag under <dataset>/targets")
    parser.add_argument("--iou", type=float, default=0.5)
    args = parser.parse_args()

    for split in args.splits:
        data = load_split(args.results, args.dataset, split, args.tag)
        cls, covered, hit = match(data, args.iou)
        print(f"## {args.dataset}/{split}: {data['targets_root']}")
        print(f"proposals {len(hit)}, hit share at IoU >= {args.iou}: {hit.mean():.3f}; "
              f"object recall {covered.mean():.3f} of {len(covered)} objects")
        if hit.sum() < 2:
            print("fewer than two hits: no semantic measure")
            continue
        labels = cls[hit].astype(str)
        values, counts = np.unique(labels, return_counts=True)
        print("hits per class: " + ", ".join(f"{v} {c}" for v, c in zip(values, counts)))
        ami = adjusted_mutual_info_score(labels, data["cluster"][hit])
        ami_bg = adjusted_mutual_info_score(hit, data["cluster"])
        print(f"AMI(pseudo-class, class) on hits: {ami:.3f}; AMI(pseudo-class, hit/background) on all: {ami_bg:.3f}")
        images = np.array([t.split("__")[0] for t in data["tile"][hit]])
        print(f"1-NN class accuracy of the targets on hits, neighbour from another image: "
              f"{knn_accuracy(data['embedding'][hit], labels, images):.3f} "
              f"(majority class {counts.max() / counts.sum():.3f})")
        for name, value in cosine_stats(data["embedding"], cls, hit).items():
            print(f"mean cosine, {name}: {value:.3f}")
        pretrain_root = args.results / "pretrain" / data["targets_root"].parent.name / data["targets_root"].name
        for metrics in sorted(pretrain_root.glob("*/metrics.jsonl")):
            c = convergence(metrics)
            parts = [f"{k} {v[0]:.3f}→{v[1]:.3f}" if isinstance(v, tuple) else f"{k} {v:.3f}" for k, v in c.items()
                     if k != "steps"]
            print(f"pre-training {metrics.parent.name} ({c['steps']} steps): " + "; ".join(parts))


if __name__ == "__main__":
    main()
