"""Set criterion: each loss against a hand-computed case, all branches, empty targets."""
import math

import pytest
import torch

from mutdet.losses import build_criterion, loss_suffixes, sigmoid_focal_loss

TARGETS = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[40.0, 60.0, 40.0, 20.0, 0.0]]),
            "size": torch.tensor([100, 200])}]  # normalised (0.2, 0.6, 0.2, 0.2), AR 2


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    p_t = p if t else 1 - p
    return -(alpha if t else 1 - alpha) * (1 - p_t) ** gamma * math.log(p_t)


def _outputs():
    """Query 1 is the obvious match: close box, right class."""
    return {"pred_logits": torch.tensor([[[0.5, -1.0], [-2.0, 1.5]]]),
            "pred_boxes": torch.tensor([[[0.8, 0.2, 0.1, 0.1], [0.25, 0.6, 0.2, 0.1]]]),
            "pred_angle_logits": torch.zeros(1, 2, 180)}


def test_focal_loss_by_hand():
    logits, targets = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])
    want = torch.tensor([_focal(0.5, 1), _focal(-2.0, 0), _focal(3.0, 0)])
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), want)


def test_each_loss_by_hand():
    criterion = build_criterion(num_classes=2, num_decoder_layers=1)
    losses = criterion(_outputs(), TARGETS)
    assert set(losses) == {"loss_cls", "loss_l1", "loss_giou", "loss_angle"}
    cls = _focal(0.5, 0) + _focal(-1.0, 0) + _focal(-2.0, 0) + _focal(1.5, 1)  # / 1 target box
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(cls))
    torch.testing.assert_close(losses["loss_l1"], torch.tensor(0.15))  # |0.25 - 0.2| + |0.1 - 0.2|
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(1 - (1 / 3 - 0.1)))
    # zero logits: BCE = log 2 in every bin whatever the target; weight 2 * 2 / 3; mean over 180 bins
    torch.testing.assert_close(losses["loss_angle"], torch.tensor(math.log(2) * 4 / 3))


def test_all_branches_and_weight_dict():
    criterion = build_criterion(num_classes=2, num_decoder_layers=3)
    last = _outputs()
    outputs = dict(last, aux_outputs=[_outputs(), _outputs()],
                   enc_outputs={"pred_logits": torch.tensor([[[0.0], [2.0]]]), "pred_boxes": last["pred_boxes"],
                                "pred_angle_logits": last["pred_angle_logits"]})
    # denoising: 2 groups of [positive, negative]; positives reproduce the target exactly
    dn_boxes = torch.tensor([[[0.2, 0.6, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1], [0.2, 0.6, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]])
    dn = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": dn_boxes, "pred_angle_logits": torch.zeros(1, 4, 180)}
    outputs["dn_outputs"] = dict(dn, aux_outputs=[dn, dn])
    outputs["dn_meta"] = {"num_queries": 4, "num_groups": 2, "max_targets": 1, "group_size": 2}
    losses = criterion(outputs, TARGETS)
    assert set(losses) == set(criterion.weight_dict)
    assert set(criterion.weight_dict) == {f"loss_{n}{s}" for n in ("cls", "l1", "giou", "angle")
                                          for s in loss_suffixes(3)}
    assert {"loss_cls_1", "loss_cls_enc", "loss_cls_dn", "loss_cls_dn_1"} <= set(losses)
    for suffix in ("", "_0", "_1"):
        torch.testing.assert_close(losses["loss_l1" + suffix], torch.tensor(0.15))
    # encoder: class-agnostic, the target is the single objectness class
    cls_enc = _focal(0.0, 0) + _focal(2.0, 1)
    torch.testing.assert_close(losses["loss_cls_enc"], torch.tensor(cls_enc))
    # denoising: queries 0 and 2 are positives (exact boxes), normalised by 2 positives
    torch.testing.assert_close(losses["loss_l1_dn"], torch.tensor(0.0))
    torch.testing.assert_close(losses["loss_giou_dn"], torch.tensor(0.0))
    cls_dn = (2 * _focal(0.0, 1) + 6 * _focal(0.0, 0)) / 2
    torch.testing.assert_close(losses["loss_cls_dn"], torch.tensor(cls_dn))
    assert criterion.weight_dict["loss_giou_dn_1"] == 5.0 and criterion.weight_dict["loss_cls_enc"] == 2.0


def test_empty_targets_give_finite_losses_and_gradients():
    criterion = build_criterion(num_classes=2, num_decoder_layers=1)
    outputs = {k: v.clone().requires_grad_(True) for k, v in _outputs().items()}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 5),
              "size": torch.tensor([100, 200])}]
    losses = criterion(outputs, empty)
    for key in ("loss_l1", "loss_giou", "loss_angle"):
        assert float(losses[key].detach()) == 0.0
    cls = sum(_focal(x, 0) for x in (0.5, -1.0, -2.0, 1.5))  # every query is background, / max(0, 1)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(cls))
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_label_out_of_range_is_an_error():
    criterion = build_criterion(num_classes=2, num_decoder_layers=1)
    with pytest.raises(ValueError, match="labels"):
        criterion(_outputs(), [dict(TARGETS[0], labels=torch.tensor([2]))])


def test_match_seam_gives_the_same_losses():
    criterion = build_criterion(num_classes=2, num_decoder_layers=2)
    outputs = dict(_outputs(), aux_outputs=[_outputs()])
    indices = criterion.match(outputs, TARGETS)
    assert set(indices) == {"", "_0"}
    assert [(q.tolist(), j.tolist()) for q, j in indices[""]] == [([1], [0])]
    reused = criterion(outputs, TARGETS, indices=indices)
    fresh = criterion(outputs, TARGETS)
    assert reused.keys() == fresh.keys() and all(torch.equal(reused[k], fresh[k]) for k in fresh)
