"""wandb side of the Tracker: one run per job (id kept across a resume), group / name / project from
arguments or the environment, offline by default; a real offline run with the installed wandb."""
from __future__ import annotations

import sys
import types

import pytest

from mutdet.engine.tracking import Tracker, read_jsonl, resolve_wandb_mode, wandb_run_id


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", module)
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MUTDET_WANDB_GROUP", "MUTDET_WANDB_NAME", "SLURM_JOB_ID",
                "SLURM_JOB_NAME", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return runs


def test_offline_by_default_one_run_per_job_and_resume_keeps_the_id(tmp_path, fake_wandb, monkeypatch):
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("MUTDET_WANDB_GROUP", "exp-1")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    t = Tracker(tmp_path / "job" / "metrics.jsonl", name="finetune-tiny", config={"lr": 1e-4}, job_type="finetune")
    t.log({"step": 1, "loss": 2.0, "note": "x"})
    t.close()
    first = fake_wandb[0]
    kw = first.kwargs
    assert kw["mode"] == "offline" and kw["resume"] is None and kw["dir"] == str(tmp_path / "job")
    assert kw["group"] == "exp-1" and kw["name"] == "finetune-tiny" and kw["project"] == "mutdet"
    assert kw["job_type"] == "finetune" and kw["config"] == {"lr": 1e-4, "slurm": {"SLURM_JOB_ID": "123"}}
    assert first.logged == [(1, {"step": 1, "loss": 2.0})] and first.finished
    assert (tmp_path / "job" / "wandb" / "mutdet-run-id").read_text().strip() == kw["id"]
    # the same job resumed after pre-emption: same run id; a fresh start of the job: a new one
    Tracker(tmp_path / "job" / "metrics.jsonl", resume_step=1).close()
    assert fake_wandb[1].kwargs["id"] == kw["id"]
    Tracker(tmp_path / "job" / "metrics.jsonl").close()
    assert fake_wandb[2].kwargs["id"] != kw["id"]
    assert wandb_run_id(tmp_path / "job", resume=True) == fake_wandb[2].kwargs["id"]
    # another job: another run
    Tracker(tmp_path / "other" / "metrics.jsonl").close()
    assert fake_wandb[3].kwargs["id"] not in (kw["id"], fake_wandb[2].kwargs["id"])


def test_arguments_and_environment(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "proj-env")
    monkeypatch.setenv("MUTDET_WANDB_NAME", "finetune/init~none/frac~1.0")
    Tracker(tmp_path / "m.jsonl", wandb_mode="online", group="exp-arg", name="test", tags=["a"]).close()
    kw = fake_wandb[0].kwargs
    assert kw["mode"] == "online" and kw["resume"] == "allow" and kw["project"] == "proj-env"
    assert kw["group"] == "exp-arg" and kw["name"] == "finetune/init~none/frac~1.0" and kw["tags"] == ["a"]
    assert "slurm" not in kw["config"]
    Tracker(tmp_path / "m.jsonl", wandb_mode="disabled").close()
    Tracker(tmp_path / "n.jsonl", enabled=False).close()
    assert len(fake_wandb) == 1


def test_real_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MUTDET_WANDB_GROUP", "ci")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = Tracker(tmp_path / "metrics.jsonl", name="tiny", config={"a": 1})
    t.log({"step": 1, "loss": 1.5})
    t.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb" / "mutdet-run-id").read_text().strip()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.5}]
