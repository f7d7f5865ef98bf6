"""Post-processing: top-k over queries x classes, boxes back to le90 pixels."""
import math

import torch

from mutdet.models import ARCSLCoder, PostProcess


def test_topk_and_le90_pixels():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1], logits[0, 0, 0] = 3.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.1, 0.3]]])
    angle_logits = torch.zeros(1, 3, 180)
    angle_logits[0, 0, 100] = 5.0  # 10.5 degrees
    angle_logits[0, 2, 30] = 5.0  # -59.5 degrees, but h > w: becomes w >= h, +90 degrees
    results = PostProcess(angle_coder=ARCSLCoder(), num_select=2)({"pred_logits": logits, "pred_boxes": boxes,
                                                                    "pred_angle_logits": angle_logits},
                                                                   torch.tensor([[100, 200]]))
    r = results[0]
    torch.testing.assert_close(r["scores"], torch.tensor([3.0, 1.0]).sigmoid())
    assert r["labels"].tolist() == [1, 0]
    want = torch.tensor([[50.0, 75.0, 30.0, 20.0, math.radians(-59.5 + 90)],
                         [100.0, 50.0, 40.0, 10.0, math.radians(10.5)]])
    torch.testing.assert_close(r["boxes"], want)
