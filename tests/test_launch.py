"""GPU-job launcher: device locks (fake device lists), kept environments, torchrun commands, signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mutdet.engine import launch as L

PY = sys.executable
# Child that records what it sees, then sleeps (until a file appears, or a time-out) and records SIGTERM.
CHILD = r"""
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def on_term(signum, frame):
    out.with_suffix(".sig").write_text(str(signum))
    sys.exit(42)
signal.signal(signal.SIGTERM, on_term)
out.write_text(repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
stop = Path(sys.argv[2]) if len(sys.argv) > 2 else None
deadline = time.time() + 30
while stop is not None and not stop.exists() and time.time() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "MUTDET_GPUS", *L.SLURM_GPU_VARS)}
    env.update(extra)
    return env


def _launcher(args, env, **kw):
    return subprocess.Popen([PY, "-m", "mutdet.engine.launch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear in {timeout} s")


def test_claims_are_exclusive_and_released(tmp_path):
    locks = tmp_path / "locks"
    first = L.claim_devices(2, ["0", "1", "2"], locks, poll=0.01, timeout=1)
    assert sorted(first) == ["0", "1"]
    second = L.claim_devices(1, ["0", "1", "2"], locks, poll=0.01, timeout=1)
    assert list(second) == ["2"]
    with pytest.raises(TimeoutError, match="no 1 free GPU"):  # everything held: blocks, here up to 0.2 s
        L.claim_devices(1, ["0", "1", "2"], locks, poll=0.05, timeout=0.2)
    L.release_devices(first)
    assert sorted(L.claim_devices(2, ["0", "1", "2"], locks, poll=0.01, timeout=1)) == ["0", "1"]
    with pytest.raises(ValueError, match="only 3 device"):
        L.claim_devices(4, ["0", "1", "2"], locks)


def test_waiting_claim_gets_the_device_when_it_is_released(tmp_path, caplog):
    locks = tmp_path / "locks"
    held = L.claim_devices(1, ["7"], locks)
    got = {}
    thread = threading.Thread(target=lambda: got.update(L.claim_devices(1, ["7"], locks, poll=0.02, timeout=20)))
    with caplog.at_level("INFO", logger="mutdet.launch"):
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive() and not got  # blocked while held
        L.release_devices(held)
        thread.join(20)
    assert list(got) == ["7"]
    assert "waiting for 1 free GPU(s) of ['7']" in caplog.text
    L.release_devices(got)


def test_two_concurrent_jobs_get_different_devices_and_locks_die_with_the_job(tmp_path, child):
    locks, stop = tmp_path / "locks", tmp_path / "stop"
    env = _env(MUTDET_GPUS="0,1")
    jobs = [_launcher(["--gpus", "1", "--lock-dir", str(locks), "--poll", "0.05", "--", PY, str(child),
                       str(tmp_path / f"job{i}.txt"), str(stop)], env) for i in range(2)]
    seen = sorted(_wait_for(tmp_path / f"job{i}.txt") for i in range(2))
    assert seen == ["'0'", "'1'"]
    # a third job waits for a free GPU ...
    third = _launcher(["--gpus", "1", "--lock-dir", str(locks), "--poll", "0.05", "--", PY, str(child),
                       str(tmp_path / "job2.txt")], env)
    time.sleep(1.0)
    assert third.poll() is None and not (tmp_path / "job2.txt").exists()
    # ... and gets the device of a job that is killed outright (SIGKILL: no clean-up code runs)
    os.kill(jobs[0].pid, signal.SIGKILL)
    assert third.wait(30) == 0
    assert "waiting for 1 free GPU(s)" in third.stdout.read()
    assert _wait_for(tmp_path / "job2.txt") in ("'0'", "'1'")
    stop.write_text("x")
    assert jobs[1].wait(30) == 0
    jobs[0].wait(30)
    assert sorted(L.claim_devices(2, ["0", "1"], locks, timeout=5, poll=0.05)) == ["0", "1"]  # all free again


def test_environment_devices_are_kept(tmp_path, child):
    locks = tmp_path / "locks"
    for extra, expected in [({"CUDA_VISIBLE_DEVICES": "3,5"}, "'3,5'"), ({"SLURM_JOB_GPUS": "2"}, "'2'"),
                            ({"CUDA_VISIBLE_DEVICES": "0", "MUTDET_GPUS": "4"}, "'0'")]:
        out = tmp_path / "seen.txt"
        rc = subprocess.run([PY, "-m", "mutdet.engine.launch", "--gpus", "1", "--lock-dir", str(locks), "--",
                             PY, str(child), str(out)], env=_env(**extra), timeout=60).returncode
        assert rc == 0 and out.read_text() == expected, extra
    assert not locks.exists()  # nothing claimed
    # --gpus 0: CPU, whatever the environment says
    out = tmp_path / "cpu.txt"
    assert L.launch([PY, str(child), str(out)], gpus=0, env=_env(CUDA_VISIBLE_DEVICES="1")) == 0
    assert out.read_text() == "''"


def test_claimed_devices_reach_the_child_and_exit_codes_pass_through(tmp_path, child):
    out = tmp_path / "seen.txt"
    assert L.launch([PY, str(child), str(out)], gpus=2, lock_dir=tmp_path / "l", env=_env(MUTDET_GPUS="4,6,8")) == 0
    assert out.read_text() == "'4,6'"
    assert L.launch([PY, "-c", "raise SystemExit(3)"], gpus=0) == 3
    assert L.launch([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], gpus=0) == 128 + 9
    assert L.candidate_devices({"MUTDET_GPUS": " 0, 2 ,"}) == ["0", "2"]
    # no GPU on the machine: CPU, with a warning, and no torchrun for --gpus 2
    out = tmp_path / "none.txt"
    assert L.launch([PY, str(child), str(out)], gpus=2, torchrun=True, lock_dir=tmp_path / "l",
                    env=_env(MUTDET_GPUS="")) == 0
    assert out.read_text() == "''"
    with pytest.raises(ValueError, match="only 1 device"):
        L.launch([PY, str(child), str(out)], gpus=2, lock_dir=tmp_path / "l", env=_env(MUTDET_GPUS="0"))
    assert L.preset_devices({"CUDA_VISIBLE_DEVICES": ""}) == "" and L.preset_devices({}) is None


def test_torchrun_command_construction():
    cmd = ["/venv/bin/python", "-m", "mutdet", "finetune", "--epochs", "3"]
    assert L.build_command(cmd, nproc=1, torchrun=True) == cmd
    assert L.build_command(cmd, nproc=4, torchrun=False) == cmd
    assert L.build_command(cmd, nproc=4, torchrun=True) == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "mutdet", "finetune", "--epochs", "3"]
    assert L.build_command(["python3", "train.py", "-x"], nproc=2, torchrun=True) == [
        "python3", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "-x"]
    assert L.build_command(["torchrun", "-m", "m"], nproc=2, torchrun=True) == [
        "torchrun", "--standalone", "--nproc_per_node=2", "-m", "m"]
    for bad in (["bash", "-c", "x"], ["python", "-u", "-m", "m"], ["python", "-m"]):
        with pytest.raises(ValueError):
            L.build_command(bad, nproc=2, torchrun=True)
    with pytest.raises(ValueError, match="no command"):
        L.build_command([], nproc=1, torchrun=False)


def test_main_parses_arguments(tmp_path, child, monkeypatch):
    calls = {}
    monkeypatch.setattr(L, "launch", lambda command, **kw: calls.update(command=command, **kw) or 0)
    assert L.main(["--gpus", "2", "--torchrun", "--", "python", "-m", "mutdet", "finetune", "--gpus", "9"]) == 0
    assert calls["command"] == ["python", "-m", "mutdet", "finetune", "--gpus", "9"]
    assert calls["gpus"] == 2 and calls["torchrun"] and calls["nproc"] is None
    with pytest.raises(SystemExit):
        L.main(["--gpus", "1", "python"])  # no --


def test_sigterm_is_forwarded_to_the_child(tmp_path, child):
    out, stop = tmp_path / "seen.txt", tmp_path / "never"
    job = _launcher(["--gpus", "0", "--", PY, str(child), str(out), str(stop)], _env())
    _wait_for(out)  # the child is running and has its handler
    job.send_signal(signal.SIGTERM)
    assert job.wait(30) == 42  # the child's own exit code
    assert (tmp_path / "seen.sig").read_text() == str(int(signal.SIGTERM))


def test_torchrun_with_two_cpu_processes(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text("import os, pathlib, sys\n"
                      "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(os.environ['WORLD_SIZE'] + ' '"
                      " + repr(os.environ['CUDA_VISIBLE_DEVICES']))\n")
    rc = L.launch([PY, str(script), str(tmp_path)], gpus=0, nproc=2, torchrun=True)
    assert rc == 0
    assert (tmp_path / "0").read_text() == (tmp_path / "1").read_text() == "2 ''"
