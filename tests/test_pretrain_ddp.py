"""The alignment losses under DDP (gloo, 2 CPU processes) equal one process with the whole batch:
pairs are gathered across ranks with an autograd-aware all_gather, and DDP's gradient averaging then
gives the single-process gradient (ranks hold different numbers of pairs)."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mutdet.losses.contrastive import contrastive_alignment_loss, l1_alignment_loss

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

SIZES = (3, 5)


def _data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(sum(SIZES), 8, generator=g)
    o = torch.randn(sum(SIZES), 8, generator=g)
    return z, o


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, results):
    import torch.distributed as tdist

    from mutdet.losses.pretrain import gather_pairs

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        z, o = _data()
        start = sum(SIZES[:rank])
        out = {}
        for name, fn in (("contrastive", lambda a, b: contrastive_alignment_loss(a, b, 0.2)), ("l1", l1_alignment_loss)):
            zl = z[start:start + SIZES[rank]].clone().requires_grad_(True)
            ol = o[start:start + SIZES[rank]].clone().requires_grad_(True)
            loss = fn(*gather_pairs(zl, ol))
            loss.backward()
            # each rank's rows receive every rank's gradient of the (identical) global loss, W times the
            # single-process one; DDP's averaging of the parameter gradients divides by W
            out[name] = (float(loss), torch.cat([zl.grad, ol.grad], 1) / 2)
        results[rank] = out
    finally:
        tdist.destroy_process_group()


def test_alignment_losses_under_ddp_equal_the_single_process_batch():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    z, o = _data()
    for name, fn in (("contrastive", lambda a, b: contrastive_alignment_loss(a, b, 0.2)), ("l1", l1_alignment_loss)):
        zs, os_ = z.clone().requires_grad_(True), o.clone().requires_grad_(True)
        loss = fn(zs, os_)
        loss.backward()
        for rank in range(2):
            value, grads = results[rank][name]
            start = sum(SIZES[:rank])
            assert abs(value - float(loss.detach())) < 1e-5, name
            expected = torch.cat([zs.grad, os_.grad], 1)[start:start + SIZES[rank]]
            torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-6)
