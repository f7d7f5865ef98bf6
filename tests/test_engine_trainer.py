"""Trainer: exact resume, non-finite loss stop, metrics file; optimiser groups and schedule; checkpoints."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from mutdet.data.datasets import TileDataset
from mutdet.data.transforms import build_transforms
from mutdet.engine.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from mutdet.engine.optim import WarmupStepSchedule, build_optimizer, build_scheduler
from mutdet.engine.tracking import Tracker, read_jsonl, resolve_wandb_mode
from mutdet.engine.trainer import EpochSampler, NonFiniteLossError, TrainConfig, Trainer
from mutdet.losses import build_criterion
from mutdet.models import build_detector

from test_data_datasets import CLASSES, make_tiles_folder

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by `make test`

TINY = dict(backbone="light", frozen_stages=-1, frozen_bn=False, embed_dim=32, num_heads=4, num_levels=2,
            num_points=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, dropout=0.1, num_queries=10,
            num_denoising_queries=6, norm_groups=8)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(num_classes=len(CLASSES), **TINY)


def make_trainer(folder, out_dir, resume_key=None, **train):
    settings = dict(epochs=2, batch_size=2, lr=1e-3, warmup_iterations=2, lr_decay_epochs=(1,), num_workers=0,
                    log_every=1, checkpoint_every_iterations=1, progress=False, seed=3)
    settings.update(train)
    dataset = TileDataset(folder, transform=build_transforms(train=True, input_size=64), skip_empty=False)
    return Trainer(model=tiny_model(), criterion=build_criterion(num_classes=len(CLASSES), num_decoder_layers=1),
                   dataset=dataset, config=TrainConfig(**settings), out_dir=out_dir, device=torch.device("cpu"),
                   run_config={"model": TINY}, resume_key=resume_key)


def test_resume_matches_uninterrupted_run(tmp_path):
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})  # 5 tiles, batch 2 -> 3 steps per epoch
    straight = make_trainer(folder, tmp_path / "straight")
    assert straight.steps_per_epoch == 3 and straight.total_steps == 6
    result = straight.fit()
    assert result["finished"] and result["step"] == 6

    first = make_trainer(folder, tmp_path / "split")
    assert first.fit(stop_after=4)["step"] == 4  # interrupted mid-epoch 1
    # scramble the global RNGs, as a new process would have them
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    second = make_trainer(folder, tmp_path / "split")  # fresh model and optimiser, resumed from last.pt
    assert second.fit()["step"] == 6

    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["epoch"] == rb["epoch"] and math.isclose(ra["lr"], rb["lr"], rel_tol=1e-12)
        for key in ra:
            if key.startswith("loss"):
                assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-6), (ra["step"], key)
    for (name, pa_), pb in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(pa_, pb, rtol=1e-5, atol=1e-6, msg=name)
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 6 and ckpt["epoch"] == 2 and ckpt["meta"]["finished"]
    assert ckpt["config"]["model"]["embed_dim"] == 32 and ckpt["config"]["train"]["batch_size"] == 2
    # lr: warm-up from lr/3 over 2 steps, x0.1 from epoch 1 (step index 3)
    assert [round(r["lr"] / 1e-3, 6) for r in a] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.1, 0.1, 0.1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    trainer = make_trainer(folder, tmp_path / "run")
    real = trainer.criterion.forward
    calls = {"n": 0}

    def poisoned(outputs, targets, indices=None):
        losses = real(outputs, targets, indices)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.criterion, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss_giou.*step 3.*last\.pt"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2  # the last good step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_gradient_accumulation_counts_steps(tmp_path):
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    trainer = make_trainer(folder, tmp_path / "acc", batch_size=1, accumulation_steps=2, epochs=1)
    assert trainer.steps_per_epoch == 3  # 5 micro-batches -> 2 + 2 + 1
    result = trainer.fit()
    assert result["step"] == 3 and result["epoch"] == 1
    record = read_jsonl(tmp_path / "acc" / "metrics.jsonl")[-1]
    assert {"epoch", "step", "lr", "loss", "loss_cls", "loss_giou_enc"} <= set(record)


def test_lr_scales_with_the_global_batch(tmp_path):
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    plain = make_trainer(folder, tmp_path / "plain", batch_size=2, accumulation_steps=2, warmup_iterations=0)
    scaled = make_trainer(folder, tmp_path / "scaled", batch_size=2, accumulation_steps=2, warmup_iterations=0,
                          lr_reference_batch=8)
    assert plain.lr == 1e-3 and scaled.global_batch == 4 and scaled.lr == pytest.approx(0.5e-3)
    assert max(g["lr"] for g in scaled.optimizer.param_groups) == pytest.approx(0.5e-3)
    assert max(g["lr"] for g in plain.optimizer.param_groups) == pytest.approx(1e-3)


def test_param_groups_and_schedule():
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-4, weight_decay=1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    low = [names[id(p)] for p in groups["low_lr"]["params"]]
    assert groups["low_lr"]["lr"] == pytest.approx(1e-5) and groups["base"]["lr"] == 1e-4
    assert all(n.startswith("backbone.") or "sampling_offsets" in n for n in low)
    assert any("sampling_offsets" in n for n in low) and any(n.startswith("backbone.") for n in low)
    assert not any("sampling_offsets" in names[id(p)] for p in groups["base"]["params"])
    assert all(g["weight_decay"] == 1e-5 for g in opt.param_groups)
    sched = WarmupStepSchedule(warmup_iterations=500, warmup_ratio=1 / 3, milestones=[1000], gamma=0.1)
    assert sched(0) == pytest.approx(1 / 3) and sched(250) == pytest.approx(2 / 3) and sched(500) == 1.0
    assert sched(999) == 1.0 and sched(1000) == pytest.approx(0.1)
    s = build_scheduler(opt, warmup_iterations=4, milestones=[6])
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), s.step()
    assert lrs[0] == pytest.approx(1e-4 / 3) and lrs[4] == pytest.approx(1e-4) and lrs[6] == pytest.approx(1e-5)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model)
    sched = build_scheduler(opt, warmup_iterations=3)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched, epoch=1, batch=2, step=3,
                           config={"out": tmp_path, "x": (1, 2)}, rng=state)
    assert not list(tmp_path.glob(".*.tmp"))
    ckpt = load_checkpoint(path)  # weights_only=True inside
    assert ckpt["config"] == {"out": str(tmp_path), "x": [1, 2]} and ckpt["step"] == 3
    set_rng_state(ckpt["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    sched2 = build_scheduler(build_optimizer(tiny_model()), warmup_iterations=3)
    sched2.load_state_dict(ckpt["scheduler"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_epoch_sampler_is_seeded_and_splits_ranks():
    s = EpochSampler(7, seed=1)
    s.epoch = 2
    a = s.indices()
    assert sorted(a) == list(range(7)) and a != list(range(7))
    other = EpochSampler(7, seed=1)
    other.epoch = 2
    assert other.indices() == a  # same seed and epoch -> same order
    other.epoch = 3
    assert other.indices() != a
    s.start = 3
    assert list(s) == a[3:] and len(s) == 4
    r0, r1 = EpochSampler(7, seed=1, rank=0, world_size=2), EpochSampler(7, seed=1, rank=1, world_size=2)
    assert len(r0.indices()) == len(r1.indices()) == 4 and set(r0.indices()) | set(r1.indices()) == set(range(7))


def test_tracker_jsonl_and_resume_truncation(tmp_path):
    assert resolve_wandb_mode(None) == "disabled"  # from the fixture's WANDB_MODE
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb mode"):
        resolve_wandb_mode("sometimes")
    t = Tracker(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        t.log({"step": step, "loss": float("nan") if step == 3 else 1.0})
    t.close()
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[2])["loss"] == "nan"
    Tracker(tmp_path / "m.jsonl", resume_step=2).close()
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]
    Tracker(tmp_path / "other.jsonl", enabled=False).log({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_data_loader_workers_do_not_change_the_run(tmp_path):
    """Augmentation is seeded per (seed, epoch, item): worker processes give the same losses."""
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    runs = {}
    for workers in (0, 1):
        trainer = make_trainer(folder, tmp_path / f"w{workers}", epochs=1, num_workers=workers)
        trainer.fit()
        runs[workers] = [r["loss"] for r in read_jsonl(tmp_path / f"w{workers}" / "metrics.jsonl")]
    assert len(runs[0]) == 3
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


@pytest.mark.reliability
@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"resume_key": {"model": TINY, "init": "another checkpoint"}},
                                    {"epochs": 1}])
def test_a_changed_run_does_not_resume_stale_weights(tmp_path, change, caplog):
    """A finished last.pt of other settings (lr, the stage's key: model, inputs, init, code) or past the
    run's end is set aside with its metrics, and the run trains from step 0 to what a fresh run gives."""
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    assert make_trainer(folder, tmp_path / "run").fit()["step"] == 6
    old = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    changed = make_trainer(folder, tmp_path / "run", **change)
    with caplog.at_level("WARNING", logger="mutdet"):
        result = changed.fit()
    assert "not resuming from" in caplog.text
    assert ("past this run's last step" if "epochs" in change else "other settings, inputs or code") in caplog.text
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")][0] == 1  # trained from scratch
    fresh = make_trainer(folder, tmp_path / "fresh", **change)
    assert fresh.fit()["step"] == result["step"] > 0
    for (name, a), b in zip(fresh.model.state_dict().items(), changed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    stale = list((tmp_path / "run" / "checkpoints" / "stale").iterdir())
    assert sorted(p.suffix for p in stale) == [".jsonl", ".pt"]  # nothing computed is lost
    kept = load_checkpoint(next(p for p in stale if p.suffix == ".pt"))
    torch.testing.assert_close(kept["model"], old["model"], rtol=0, atol=0)


@pytest.mark.reliability
def test_logging_and_worker_settings_still_resume(tmp_path):
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    assert make_trainer(folder, tmp_path / "run").fit(stop_after=4)["step"] == 4
    again = make_trainer(folder, tmp_path / "run", log_every=5, checkpoint_every_iterations=2, num_workers=1)
    assert again.resume() and again.step == 4


@pytest.mark.reliability
@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10])
def test_an_unreadable_last_checkpoint_starts_fresh(tmp_path, content, caplog):
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 3, "b": 2})
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(content)
    with caplog.at_level("WARNING", logger="mutdet"):
        assert make_trainer(folder, tmp_path / "run", epochs=1).fit()["step"] == 3
    assert "cannot be read" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "stale" / "last-unkeyed.pt").read_bytes() == content


@pytest.mark.reliability
@pytest.mark.parametrize("content, message", [(b"", "the file is empty"),
                                              (b"\x80\x02garbage" * 10, "not a readable checkpoint")])
def test_a_bad_checkpoint_file_is_a_clear_error_without_unsafe_advice(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)
