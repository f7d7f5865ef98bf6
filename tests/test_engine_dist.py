"""dist helpers without a process group, and one real 2-process DDP run (gloo, CPU)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mutdet.engine import dist

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`


def test_helpers_are_no_ops_without_process_group():
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()
    dist.barrier()
    model = torch.nn.Linear(2, 2)
    assert dist.wrap_model(model, torch.device("cpu")) is model and dist.unwrap_model(model) is model
    assert dist.reduce_mean({"a": 2.0}, torch.device("cpu")) == {"a": 2.0}
    assert dist.init_distributed(torch.device("cpu")) == torch.device("cpu")  # WORLD_SIZE unset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, out_dir: str, results: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    import test_engine_trainer as helpers

    dist.init_distributed(torch.device("cpu"))
    trainer = helpers.make_trainer(folder, out_dir, epochs=1)
    out = trainer.fit()
    results[rank] = {"step": out["step"], "params": torch.cat([p.detach().flatten() for p in trainer.model.parameters()])}
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_keep_parameters_in_sync(tmp_path):
    from test_data_datasets import make_tiles_folder

    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})  # 5 tiles -> 3 per rank -> 2 steps
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path / "ddp"), results), nprocs=2, join=True)
    assert results[0]["step"] == results[1]["step"] == 2
    torch.testing.assert_close(results[0]["params"], results[1]["params"])
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").is_file()
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 only
