"""Denoising queries: layout, attention mask, noise ranges; target normalisation."""
import math

import pytest
import torch
from torch import nn

from mutdet.models.box_ops import normalize_targets
from mutdet.models.denoising import denoising_indices, make_denoising_queries


def _targets(counts):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in counts:
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 60 + 20, torch.full((n, 1), 16.0), torch.full((n, 1), 8.0),
                           (torch.rand(n, 1, generator=g) - 0.5) * math.pi], 1)
        out.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": boxes, "size": torch.tensor([100, 100])})
    return normalize_targets(out)


def test_layout_and_attention_mask():
    torch.manual_seed(0)
    embed = nn.Embedding(5, 8)
    dn = make_denoising_queries(_targets([3, 1]), label_embed=embed, num_matching_queries=4, num_denoising_queries=7)
    g, size = 2, 6  # 7 // 3 groups of [3 positives, 3 negatives]
    assert dn.meta == {"num_queries": 12, "num_groups": g, "max_targets": 3, "group_size": size}
    assert dn.content.shape == (2, 12, 8) and dn.boxes.shape == (2, 12, 4) and dn.angles.shape == (2, 12)
    # padding slots of image 1 (it has one target): zero content, centre box
    for slot in (1, 2, 4, 5, 7, 8, 10, 11):
        assert not dn.content[1, slot].any() and dn.boxes[1, slot].tolist() == [0.5] * 4
    mask = dn.attn_mask
    assert mask.shape == (16, 16)
    assert mask[12:, :12].all() and not mask[12:, 12:].any()  # matching queries never see denoising ones
    assert not mask[:6, :6].any() and mask[:6, 6:12].all() and mask[6:12, :6].all()  # groups are isolated
    assert not mask[:12, 12:].any()
    indices = denoising_indices([3, 1], dn.meta)
    assert indices[0][0].tolist() == [0, 1, 2, 6, 7, 8] and indices[0][1].tolist() == [0, 1, 2, 0, 1, 2]
    assert indices[1][0].tolist() == [0, 6] and indices[1][1].tolist() == [0, 0]


def test_noise_ranges():
    torch.manual_seed(1)
    targets = _targets([50])
    dn = make_denoising_queries(targets, label_embed=nn.Embedding(5, 8), num_matching_queries=4,
                                num_denoising_queries=400, box_noise=0.4, angle_noise=0.02)
    t = targets[0]
    slots = torch.arange(dn.meta["num_queries"])
    positive = (slots % dn.meta["group_size"]) < 50
    j = slots % 50
    centre_shift = (dn.boxes[0, :, :2] - t["boxes"][j, :2]).abs() / (t["boxes"][j, 2:] / 2)
    assert centre_shift[positive].max() <= 0.4 + 1e-5  # corners move by < 0.4 half-sides
    angle = torch.remainder(dn.angles[0] - t["angles"][j] + math.pi / 2, math.pi) - math.pi / 2
    assert angle[positive].abs().max() <= 0.02 * math.pi + 1e-6
    assert angle[~positive].abs().min() >= 0.02 * math.pi - 1e-6  # negatives move by [1, 2) x the scale
    assert angle[~positive].abs().max() <= 0.04 * math.pi + 1e-6
    assert ((dn.angles >= -math.pi / 2) & (dn.angles < math.pi / 2)).all()


def test_no_targets_no_queries():
    assert make_denoising_queries(_targets([0, 0]), label_embed=nn.Embedding(5, 8), num_matching_queries=4) is None


def test_normalize_targets_checks_the_format():
    good = {"labels": torch.tensor([1]), "boxes": torch.tensor([[40.0, 30.0, 20.0, 10.0, 0.5]]),
            "size": torch.tensor([60, 80])}
    out = normalize_targets([good])[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.5, 0.5, 0.25, 1 / 6]]))
    assert out["angles"].tolist() == [0.5] and out["sides"].tolist() == [[20.0, 10.0]]
    with pytest.raises(KeyError, match="size"):
        normalize_targets([{k: v for k, v in good.items() if k != "size"}])
    with pytest.raises(ValueError, match="boxes"):
        normalize_targets([dict(good, boxes=torch.zeros(1, 4))])
    with pytest.raises(ValueError, match="int64"):
        normalize_targets([dict(good, labels=torch.tensor([1], dtype=torch.int32))])
