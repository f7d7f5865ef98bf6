"""The GPU options without a GPU: `make bench-gpu` skips with its reasons and exits 0; `train.compile`
and `train.attention_kernel` are validated and reach the trainer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mutdet.config import ConfigError, from_dict, read_yaml
from mutdet.engine.trainer import STATE_FREE_FIELDS, TrainConfig
from mutdet.models.deformable_attention import MultiScaleDeformableAttention

from test_data_datasets import make_tiles_folder
from test_engine_trainer import make_trainer

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_without_a_gpu_skips_everything_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "no CUDA device" in proc.stdout
    summary = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert summary["environment"]["cuda_available"] is False
    assert set(summary["sections"]) == {"launcher", "deform_attn", "finetune", "pretrain", "detect", "sam", "embed",
                                        "compile"}
    for name, section in summary["sections"].items():
        assert section["status"] == "skipped" and "no CUDA device" in section["reason"], name
    assert "| sam | skipped |" in (tmp_path / "bench-gpu.md").read_text()


@pytest.mark.parametrize("section", ["finetune", "pretrain"])
def test_train_options_are_validated(section):
    cfg = from_dict({section: {"train": {"compile": True, "attention_kernel": "triton"}}})
    part = getattr(cfg, section)
    train = part.train_kwargs(1) if section == "finetune" else part.train_kwargs()
    assert train["compile"] is True and train["attention_kernel"] == "triton"
    assert TrainConfig.from_dict(train).attention_kernel == "triton"
    defaults = getattr(from_dict({}), section).train
    assert defaults["compile"] is False and defaults["attention_kernel"] == "torch"
    # speed-only: switching them reruns no job of the demo config (they are outside the resume key too)
    def demo(**train):
        raw = read_yaml(REPO / "config.yaml")
        raw.setdefault(section, {}).setdefault("train", {}).update(train)
        return from_dict(raw)

    base = demo()
    job = dict(variant="mutdet") if section == "pretrain" else dict(dataset=base.finetune.runs[0].dataset)
    assert "compile" not in base.sections(section, **job)[section]["train"]
    digest = base.sections_digest(section, **job)
    assert demo(compile=True, attention_kernel="triton").sections_digest(section, **job) == digest
    assert demo(lr=0.123).sections_digest(section, **job) != digest
    with pytest.raises(ConfigError, match=f"{section}.train.attention_kernel"):
        from_dict({section: {"train": {"attention_kernel": "cuda"}}})
    with pytest.raises(ConfigError, match=f"{section}.train.compile"):
        from_dict({section: {"train": {"compile": "yes"}}})


def test_trainer_compiles_the_step_only_and_sets_the_attention_kernel(tmp_path):
    """compile wraps what the step calls; the model that is saved and evaluated stays the plain module
    (same state-dict keys). The kernel choice reaches every attention module (the CPU still computes
    with the torch version). Neither enters the resume key."""
    assert {"compile", "attention_kernel"} <= set(STATE_FREE_FIELDS)
    folder = make_tiles_folder(tmp_path / "tiles", {"a": 2})
    plain = make_trainer(folder, tmp_path / "plain")
    trainer = make_trainer(folder, tmp_path / "fast", compile=True, attention_kernel="triton")
    assert trainer.resume_key == plain.resume_key
    assert isinstance(trainer.wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.wrapped._orig_mod is trainer.model
    assert list(trainer.model.state_dict()) == list(plain.model.state_dict())
    kernels = {m.kernel for m in trainer.model.modules() if isinstance(m, MultiScaleDeformableAttention)}
    assert kernels == {"triton"}
    assert not isinstance(plain.wrapped, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="attention kernel"):
        make_trainer(folder, tmp_path / "bad", attention_kernel="cuda")
