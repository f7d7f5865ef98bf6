import math

import pytest
import torch

from mutdet.losses.contrastive import (alignment_stats, contrastive_alignment_loss, gather_matched,
                                       l1_alignment_loss)

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`


def hand_loss(z, o, tau):
    """The METHOD.md formula with explicit loops."""
    m = z.shape[0]
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    z = [unit(v) for v in z.tolist()]
    o = [unit(v) for v in o.tolist()]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for i in range(m):
        row = [dot(z[i], o[k]) / tau for k in range(m)]
        col = [dot(o[i], z[k]) / tau for k in range(m)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    return 2 * tau / m * total


@pytest.mark.parametrize("tau", [0.2, 0.07, 1.0])
def test_matches_hand_computation(tau):
    torch.manual_seed(0)
    z, o = torch.randn(6, 8, dtype=torch.float64) * 2, torch.randn(6, 8, dtype=torch.float64)
    loss = contrastive_alignment_loss(z, o, temperature=tau)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(hand_loss(z, o, tau), rel=1e-10, abs=1e-12)


def test_symmetric_in_z_and_o():
    torch.manual_seed(1)
    z, o = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(contrastive_alignment_loss(z, o), contrastive_alignment_loss(o, z))


def test_invariant_to_input_scale_and_default_temperature():
    torch.manual_seed(2)
    z, o = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(contrastive_alignment_loss(3.0 * z, 0.5 * o), contrastive_alignment_loss(z, o))
    torch.testing.assert_close(contrastive_alignment_loss(z, o), contrastive_alignment_loss(z, o, temperature=0.2))


def test_temperature_behaviour():
    """Orthogonal aligned pairs: each softmax row is log(1 + (M-1) e^{-1/tau}), so the loss is
    4 tau log(1 + (M-1) e^{-1/tau}), increasing in tau; for large tau loss / (2 tau) -> 2 log M."""
    m = 4
    z = torch.eye(m, 8, dtype=torch.float64)
    previous = 0.0
    for tau in [0.05, 0.1, 0.2, 0.5, 1.0]:
        loss = contrastive_alignment_loss(z, z.clone(), temperature=tau).item()
        assert loss == pytest.approx(4 * tau * math.log(1 + (m - 1) * math.exp(-1 / tau)), rel=1e-10)
        assert loss > previous
        previous = loss
    big = 1e4
    loss = contrastive_alignment_loss(z, z.clone(), temperature=big).item()
    assert loss / (2 * big) == pytest.approx(2 * math.log(m), rel=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_alignment_loss(z, z, temperature=0.0)


def test_aligned_pairs_beat_random_and_shuffled():
    torch.manual_seed(3)
    m, c = 8, 16
    z = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0][:m]  # orthonormal rows
    aligned = contrastive_alignment_loss(z, z.clone()).item()
    random = contrastive_alignment_loss(z, torch.randn(m, c, dtype=torch.float64)).item()
    shuffled = contrastive_alignment_loss(z, z[torch.roll(torch.arange(m), 1)]).item()
    assert aligned == pytest.approx(4 * 0.2 * math.log(1 + (m - 1) * math.exp(-1 / 0.2)))
    assert aligned < 0.05 < 1.0 < random < shuffled


def test_gradient_flows_into_both_sides():
    torch.manual_seed(4)
    z = torch.randn(5, 8, requires_grad=True)
    o = torch.randn(5, 8, requires_grad=True)
    contrastive_alignment_loss(z, o).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert o.grad is not None and o.grad.abs().sum() > 0


def test_empty_and_single_pair():
    z, o = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    loss = contrastive_alignment_loss(z, o)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert z.grad is not None and o.grad is not None
    z1, o1 = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = contrastive_alignment_loss(z1, o1)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(o1.grad).all()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(M, C\)"):
        contrastive_alignment_loss(torch.randn(3, 8), torch.randn(4, 8))


def test_alignment_stats():
    z = torch.eye(3, 4) * 2
    o = torch.eye(3, 4)
    o[0, 1] = 1.0  # cos(z0, o0) = 1/sqrt2, cos(z1, o0) = 1/sqrt2
    stats = alignment_stats(z, o)
    assert isinstance(stats["pos_cosine"], float) and isinstance(stats["neg_cosine"], float)
    s = 1 / math.sqrt(2)
    assert stats["pos_cosine"] == pytest.approx((s + 1 + 1) / 3)
    assert stats["neg_cosine"] == pytest.approx(s / 6)
    single = alignment_stats(torch.ones(1, 4), torch.ones(1, 4))
    assert single["pos_cosine"] == pytest.approx(1.0) and math.isnan(single["neg_cosine"])
    assert all(math.isnan(v) for v in alignment_stats(torch.zeros(0, 4), torch.zeros(0, 4)).values())


def test_l1_alignment_loss():
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    o = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = l1_alignment_loss(z, o)
    assert loss.item() == pytest.approx((1 + 2 + 1 + 2) / 4)
    loss.backward()
    assert z.grad.abs().sum() > 0
    empty = l1_alignment_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2))
    assert empty.item() == 0.0 and empty.requires_grad


def test_gather_matched_order_and_gradients():
    pred = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3).requires_grad_(True)
    targets = [torch.randn(2, 3, requires_grad=True), torch.zeros(0, 3), torch.randn(3, 3)]
    pred3 = torch.cat([pred, pred[:1]]).detach()
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([], dtype=torch.long),) * 2,
               (torch.tensor([0, 2]), torch.tensor([2, 0]))]
    z, o = gather_matched(pred3, targets, indices)
    torch.testing.assert_close(z, torch.stack([pred3[0, 3], pred3[0, 1], pred3[2, 0], pred3[2, 2]]))
    torch.testing.assert_close(o, torch.stack([targets[0][0], targets[0][1], targets[2][2], targets[2][0]]))
    # gradients reach both the predictions and a target that requires grad
    z, o = gather_matched(pred, targets[:2], indices[:2])
    assert z.shape == o.shape == (2, 3)
    contrastive_alignment_loss(z, o).backward()
    assert pred.grad[0, [1, 3]].abs().sum() > 0 and pred.grad[0, [0, 2]].abs().sum() == 0
    assert targets[0].grad.abs().sum() > 0


def test_gather_matched_empty_batch_and_errors():
    z, o = gather_matched(torch.randn(2, 4, 3), [torch.zeros(0, 3)] * 2,
                          [(torch.tensor([], dtype=torch.long),) * 2] * 2)
    assert z.shape == o.shape == (0, 3)
    assert contrastive_alignment_loss(z, o).item() == 0.0
    with pytest.raises(ValueError, match="batch"):
        gather_matched(torch.randn(2, 4, 3), [torch.zeros(0, 3)], [(torch.tensor([0]), torch.tensor([0]))])
