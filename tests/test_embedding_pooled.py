"""The pooled embedding mode: rotated RoI-align on feature maps (mutdet.embedding.rotated_crop.roi_align_rotated)
against torchvision's roi_align and a slow per-sample reference, the embedder's frame conversion, per-tile
batching, order and empty tiles (mutdet.embedding.pipeline), and the stage's artefact in both modes."""
import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from mutdet.config import ConfigError, from_dict
from mutdet.embedding.artefacts import embeddings_schema, read_embeddings, vector_matrix
from mutdet.embedding.backbone import build_embedder
from mutdet.embedding.pipeline import embed_tiles
from mutdet.embedding.rotated_crop import roi_align_rotated, roi_mean_weights
from mutdet.layout import Layout
from numerics import assert_close_to_scale, rounding_tolerance
from test_embedding_stage import COUNTS, run_small, write_inputs

F64_TOL = rounding_tolerance(torch.float64, 16)  # bilinear weights + a mean of r * r samples, in float64


def xyxy_to_rois(boxes: torch.Tensor) -> torch.Tensor:
    """torchvision ``[k, x1, y1, x2, y2]`` -> ``[k, cx, cy, w, h, 0]``."""
    k, x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([k, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(k)], -1)


def slow_reference(features: torch.Tensor, roi, out_hw, scale, ratio, context=1.0) -> torch.Tensor:
    """One rotated RoI, one sample at a time, written from torchvision's roi_align kernel (aligned=True)."""
    k, cx, cy, w, h, t = (float(v) for v in roi)
    sx, sy = scale if isinstance(scale, tuple) else (scale, scale)
    _, channels, height, width = features.shape
    out_h, out_w = out_hw
    u, v = (math.cos(t), math.sin(t)), (-math.sin(t), math.cos(t))
    out = torch.zeros(channels, out_h, out_w, dtype=features.dtype)
    fmap = features[int(k)]

    def bilinear(y, x):
        if y < -1 or y > height or x < -1 or x > width:
            return torch.zeros(channels, dtype=features.dtype)
        y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
        y0, x0 = min(int(math.floor(y)), height - 1), min(int(math.floor(x)), width - 1)
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
                + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])

    for i in range(out_h):
        for j in range(out_w):
            acc = torch.zeros(channels, dtype=features.dtype)
            for si in range(ratio):
                for sj in range(ratio):
                    a = ((j + (sj + 0.5) / ratio) / out_w - 0.5) * context * w  # along u
                    b = ((i + (si + 0.5) / ratio) / out_h - 0.5) * context * h  # along v
                    x, y = cx + a * u[0] + b * v[0], cy + a * u[1] + b * v[1]
                    acc += bilinear(y * sy - 0.5, x * sx - 0.5)
            out[:, i, j] = acc / ratio ** 2
    return out


@pytest.fixture
def fmaps():
    return torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# --- rotated RoI-align on feature maps ------------------------------------------------------------------------


def test_axis_aligned_equals_torchvision_roi_align(fmaps):
    # Inside, straddling the border, entirely beyond it (torchvision's -1 / size rule), sub-cell boxes.
    boxes = torch.tensor([[0, 1.0, 1.5, 6.3, 5.2], [1, -2.0, -1.0, 4.0, 3.0], [1, 5, 3, 12, 9.5],
                          [0, 2.2, 0.3, 2.9, 1.1], [1, 30.0, 20.0, 40.0, 30.0]], dtype=torch.float64)
    for scale, ratio in ((0.5, 2), (1.0, 1), (0.75, 3)):
        expected = roi_align(fmaps, boxes, (3, 4), spatial_scale=scale, sampling_ratio=ratio, aligned=True)
        got = roi_align_rotated(fmaps, xyxy_to_rois(boxes), (3, 4), spatial_scale=scale, sampling_ratio=ratio)
        assert_close_to_scale(got, expected, F64_TOL, f"scale {scale} ratio {ratio}")
    assert float(got[-1].abs().max()) == 0.0  # beyond the map: zeros


def test_quarter_turn_equals_roi_align_on_the_transposed_map(fmaps):
    # theta = -pi/2: the box's w axis points up (-y), its h axis along +x. Sample (i, j) sits at
    # (cx + b_i, cy - a_j): rows run along x, columns along -y: roi_align on the transposed map, columns flipped.
    cx, cy, w, h = 3.7, 2.9, 5.0, 3.2
    rois = torch.tensor([[1, cx, cy, w, h, -math.pi / 2]], dtype=torch.float64)
    got = roi_align_rotated(fmaps, rois, (3, 5), spatial_scale=1.0, sampling_ratio=2)
    box_t = torch.tensor([[1, cy - w / 2, cx - h / 2, cy + w / 2, cx + h / 2]], dtype=torch.float64)
    expected = roi_align(fmaps.transpose(-1, -2), box_t, (3, 5), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert_close_to_scale(got, expected.flip(-1), F64_TOL)


@pytest.mark.parametrize("theta", [-1.2, -0.3, 0.7, 1.5])
@pytest.mark.parametrize("context", [1.0, 1.5])
def test_rotated_equals_the_slow_reference(fmaps, theta, context):
    rois = torch.tensor([[0, 4.1, 3.3, 6.0, 2.5, theta], [1, 1.0, 6.0, 5.0, 4.0, theta]], dtype=torch.float64)
    scale = (0.8, 0.7)  # per axis: the sample grid is laid out in the image, then scaled
    got = roi_align_rotated(fmaps, rois, (2, 3), spatial_scale=scale, sampling_ratio=3, context=context)
    for n in range(len(rois)):
        assert_close_to_scale(got[n], slow_reference(fmaps, rois[n], (2, 3), scale, 3, context), F64_TOL, f"roi {n}")


@pytest.mark.parametrize("theta", [-math.pi / 2, -0.9, 0.0, 0.4])
def test_mean_weights_equal_the_mean_over_the_bins(fmaps, theta):
    # Inside, straddling the top-left corner, and the far edge (clamped corners that coincide add up).
    boxes = torch.tensor([[4.1, 3.3, 6.0, 2.5, theta], [0.2, -0.4, 5.0, 4.0, theta], [8.9, 6.8, 3.0, 2.0, theta]],
                         dtype=torch.float64)
    rois = torch.cat([torch.ones(3, 1, dtype=torch.float64), boxes], 1)  # all on image 1
    kwargs = {"spatial_scale": (0.9, 1.1), "sampling_ratio": 2, "context": 1.5}
    expected = roi_align_rotated(fmaps, rois, (3, 2), **kwargs).mean(dim=(2, 3))  # (3, C)
    weights = roi_mean_weights(boxes, (7, 9), (3, 2), **kwargs)  # (3, 63)
    assert weights.shape == (3, 63) and float(weights.min()) >= 0 and float(weights.sum(1).max()) <= 1 + 1e-12
    assert_close_to_scale(weights @ fmaps[1].flatten(1).T, expected, rounding_tolerance(torch.float64, 4 * 36))


def test_chunks_and_empty_input(fmaps):
    rois = torch.tensor([[k % 2, 1 + k, 2 + k / 3, 3.0, 2.0, 0.1 * k] for k in range(7)], dtype=torch.float64)
    whole = roi_align_rotated(fmaps, rois, (2, 2), spatial_scale=1.0)
    torch.testing.assert_close(roi_align_rotated(fmaps, rois, (2, 2), spatial_scale=1.0, chunk=2), whole,
                               rtol=0, atol=0)
    assert roi_align_rotated(fmaps, rois[:0], (2, 2)).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match=r"batch indices must be in \[0, 2\)"):
        roi_align_rotated(fmaps, torch.tensor([[2, 1, 1, 1, 1, 0.0]]), (2, 2))


# --- the embedder ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    return build_embedder(backbone="resnet18", weights="none", crop_size=64, context=1.0)


def test_whole_frame_box_averages_the_whole_c5_map(embedder):
    # Tile 48 x 48 resized to 128: C5 is 4 x 4; crop_size 64 -> 2 x 2 bins of 2 x 2 samples = 4 samples a
    # side, at (i + 1/2) / 4 * 4 - 1/2 = i: exactly the cell centres. A box over the whole frame (le90,
    # pixel centres at integers: centre 23.5) therefore averages the whole map, at any quarter turn.
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 4 - 2
    boxes = torch.tensor([[23.5, 23.5, 48.0, 48.0, 0.0], [23.5, 23.5, 48.0, 48.0, -math.pi / 2]], dtype=torch.float64)
    with torch.inference_mode():
        got = embedder.pooled(image, boxes, torch.zeros(2, dtype=torch.int64), [(48, 48)])
        c5 = embedder.backbone(image)[-1]
    assert c5.shape[-2:] == (4, 4) and got.shape == (2, 512) and got.dtype == torch.float32
    expected = c5.mean(dim=(2, 3)).expand(2, -1)
    assert_close_to_scale(got, expected, rounding_tolerance(torch.float32, 4 * 16))  # 16 samples, 4 corners each


def test_boxes_in_tile_pixels_match_torchvision_on_c5():
    # A tile of 100 x 61 resized to 128 x 78 (x 1.28 and x 1.2787: the per-axis scale of a rounded resize),
    # context 1.5, axis-aligned boxes, one partly outside: torchvision's roi_align on C5 with the boxes
    # converted by hand (edges at x + 1/2, times each axis' scale, stride 32).
    emb = build_embedder(backbone="resnet18", weights="none", crop_size=96, context=1.5)
    image = torch.rand(1, 3, 78, 128, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[40.0, 30.0, 30.0, 12.0, 0.0], [2.0, 55.0, 40.0, 20.0, 0.0]], dtype=torch.float64)
    with torch.inference_mode():
        got = emb.pooled(image, boxes, torch.zeros(2, dtype=torch.int64), [(100, 61)])
        c5 = emb.backbone(image)[-1].double()
    half_w, half_h = 1.5 * boxes[:, 2] / 2, 1.5 * boxes[:, 3] / 2
    sx, sy = 128 / 100, 78 / 61
    xyxy = torch.stack([torch.zeros(2, dtype=torch.float64), (boxes[:, 0] + 0.5 - half_w) * sx,
                        (boxes[:, 1] + 0.5 - half_h) * sy, (boxes[:, 0] + 0.5 + half_w) * sx,
                        (boxes[:, 1] + 0.5 + half_h) * sy], 1)
    expected = roi_align(c5, xyxy, (3, 3), spatial_scale=1 / 32, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    assert torch.isfinite(got).all()
    assert_close_to_scale(got.double(), expected, rounding_tolerance(torch.float32, 4 * 36))  # 36 samples a box


def test_c4_level_runs_the_c5_stage_on_the_bins():
    # pool_level c4: C4 bins (ceil(64 / 16) = 4 a side) through layer4 -> 2 x 2 -> mean: D-dimensional.
    emb = build_embedder(backbone="resnet18", weights="none", crop_size=64, context=1.0, pool_level="c4")
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    boxes = torch.tensor([[23.5, 23.5, 48.0, 48.0, 0.0]], dtype=torch.float64)
    with torch.inference_mode():
        got = emb.pooled(image, boxes, torch.zeros(1, dtype=torch.int64), [(48, 48)])
        c4 = emb.backbone.layer3(emb.backbone.layer2(emb.backbone.layer1(emb.backbone.stem(image))))
        # The whole-frame box samples C4 (8 x 8) at 8 points a side: (i + 1/2) / 8 * 8 - 1/2 = i, every cell,
        # and each 2 x 2 sample block of a bin is a 2 x 2 block of cells.
        bins = torch.nn.functional.avg_pool2d(c4, 2)  # (1, 256, 4, 4)
        expected = emb.backbone.layer4(bins).mean(dim=(2, 3))
    assert got.shape == (1, 512)
    assert_close_to_scale(got, expected, rounding_tolerance(torch.float32, 9 * 512, depth=2))
    with pytest.raises(ValueError, match="pool_level 'c3'"):
        build_embedder(backbone="resnet18", weights="none", pool_level="c3")


def tile_item(position, size_hw, boxes, frame, seed):
    image = torch.randint(0, 256, (3, *size_hw), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return {"position": position, "tile_id": f"t{position}", "image": image, "frame_size": frame,
            "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 5)}


def test_pooled_batches_keep_order_shapes_and_empty_tiles(embedder):
    # Two shapes, empty tiles first, between and last; a pass of several tiles equals one tile per pass.
    rng = np.random.default_rng(3)

    def boxes(n, frame):
        return [[rng.uniform(5, frame[0] - 5), rng.uniform(5, frame[1] - 5), rng.uniform(8, 30), rng.uniform(4, 8),
                 rng.uniform(-math.pi / 2, math.pi / 2)] for _ in range(n)]

    spec = [(0, (64, 64)), (3, (64, 64)), (2, (64, 64)), (0, (64, 48)), (4, (64, 48)), (1, (64, 64)), (0, (64, 64))]
    tiles = [tile_item(p, (96, 96) if frame == (64, 64) else (72, 96), boxes(n, frame), frame, p)
             for p, (n, frame) in enumerate(spec)]
    big = list(embed_tiles(embedder, tiles, batch_size=64, precision="fp32", mode="pooled"))  # 2-3 tiles a pass
    small = list(embed_tiles(embedder, tiles, batch_size=1, precision="fp32", mode="pooled"))  # one tile a pass
    assert [p for p, _ in big] == [p for p, _ in small] == list(range(len(spec)))
    for (_, a), (_, b), (n, _) in zip(big, small, spec):
        assert a.shape == (n, 512) and a.dtype == np.float32
        # Batched vs single convolutions: resnet18's deepest reductions (3 x 3 x 512 terms) round differently.
        assert_close_to_scale(torch.from_numpy(a), torch.from_numpy(b),
                              rounding_tolerance(torch.float32, 9 * 512, depth=2) if n else 0.0)
    with pytest.raises(ValueError, match="embedding.mode: 'strips'"):
        next(embed_tiles(embedder, tiles, batch_size=1, mode="strips"))


# --- the stage and the config ---------------------------------------------------------------------------------


def test_stage_writes_the_same_schema_in_both_modes(tmp_path):
    tiles_dir, proposals_dir = write_inputs(tmp_path)
    crop = run_small(tiles_dir, proposals_dir, tmp_path / "crop")
    pooled = run_small(tiles_dir, proposals_dir, tmp_path / "pooled", mode="pooled")
    a, b = (read_embeddings(tmp_path / m / "embeddings.parquet") for m in ("crop", "pooled"))
    assert a.schema.remove_metadata().equals(b.schema.remove_metadata())
    assert b.schema.remove_metadata().equals(embeddings_schema(512))
    assert a.select(["tile_id", "proposal_index"]).equals(b.select(["tile_id", "proposal_index"]))
    vectors = vector_matrix(b.column("embedding"))
    assert vectors.shape == (sum(COUNTS), 512) and np.isfinite(vectors).all()
    assert not np.allclose(vectors, vector_matrix(a.column("embedding")))  # another computation, not a copy
    assert pooled["params"]["mode"] == "pooled" and crop["params"]["mode"] == "crop"
    assert pooled["params_hash"] != crop["params_hash"]
    # The mode is a parameter of the result: switching it in the same folder recomputes everything.
    switched = run_small(tiles_dir, proposals_dir, tmp_path / "crop", mode="pooled")
    assert switched["proposals_computed"] == sum(COUNTS) and switched["params_hash"] == pooled["params_hash"]
    np.testing.assert_array_equal(vector_matrix(read_embeddings(tmp_path / "crop" / "embeddings.parquet")
                                                .column("embedding")), vectors)


def test_mode_is_validated_and_changes_the_embedding_tag():
    base = {"embedding": {"backbone": "resnet18", "weights": "none"}}
    crop = from_dict(base)
    assert crop.embedding.mode == "crop"  # the paper's path by default
    pooled = from_dict({"embedding": {**base["embedding"], "mode": "pooled"}})
    assert Layout(crop).embedding_tag != Layout(pooled).embedding_tag
    assert crop.sections_digest("embed") != pooled.sections_digest("embed")
    with pytest.raises(ConfigError, match="embedding.mode"):
        from_dict({"embedding": {**base["embedding"], "mode": "strips"}})

