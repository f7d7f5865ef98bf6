"""GPU-job launcher: pick the job's GPUs, optionally start it under torchrun, pass signals on.

The GPU rules (propose, embed, pretrain, finetune) run their command through it::

    python -m mutdet.engine.launch --gpus {resources.gpu} --torchrun -- python -m mutdet finetune ...

Which GPUs:

* ``--gpus 0``: CPU only, the child gets ``CUDA_VISIBLE_DEVICES=""``.
* ``CUDA_VISIBLE_DEVICES`` already set (SLURM sets it for a job with GPUs; a user may set it): kept.
  Without it, SLURM's ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS`` / ``GPU_DEVICE_ORDINAL`` become
  ``CUDA_VISIBLE_DEVICES``.
* No GPU on the machine at all (nothing listed): a warning, and the job runs on the CPU as with
  ``--gpus 0`` (so GPU rules that ask for ``gpu=1`` still run on a laptop or a CPU-only CI).
* Otherwise (a workstation: Snakemake's ``--resources gpu=N`` limits how many GPU jobs run at once but
  never says which GPU a job gets) the launcher claims ``--gpus`` free devices among ``MUTDET_GPUS``
  (e.g. ``0,1,2,3``), else the devices ``nvidia-smi -L`` lists, else ``torch.cuda.device_count()``,
  with non-blocking ``fcntl.flock`` locks on ``<lock dir>/gpu-<i>.lock`` (``--lock-dir``, default
  ``$MUTDET_GPU_LOCK_DIR`` or ``/tmp/mutdet-gpu-locks-<uid>``), and waits (logging it) while fewer
  are free. The locks are inherited by the child and released when the last process holding them
  exits, also when it is killed: a crashed job never leaves a GPU claimed.

How it runs: with ``--torchrun`` and more than one process (``--gpus`` > 1, or ``--nproc N``, which
also allows a CPU/gloo run) a ``python [-m module | script.py] args`` command becomes
``python -m torch.distributed.run --standalone --nproc_per_node=N [-m module | script.py] args``
(``torchrun``, with the child's own interpreter); any other command runs unchanged.

Signals: SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 received by the launcher (SLURM sends SIGTERM on
``scancel``, pre-emption or time-out before it kills) are sent to the child's process group (torchrun
and its workers); the child gets SIGTERM if the launcher itself dies. The exit status is the child's
(128 + signal number if a signal ended it).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["launch", "main", "candidate_devices", "preset_devices", "claim_devices", "release_devices",
           "build_command", "default_lock_dir", "FORWARDED_SIGNALS"]

log = logging.getLogger("mutdet.launch")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SLURM_GPU_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL")


def default_lock_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("MUTDET_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"mutdet-gpu-locks-{os.getuid()}")


def preset_devices(env: Mapping[str, str]) -> str | None:
    """The devices the environment already assigns (``CUDA_VISIBLE_DEVICES``, else SLURM's), or None."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return env["CUDA_VISIBLE_DEVICES"]
    for key in SLURM_GPU_VARS:
        if env.get(key):
            return env[key]
    return None


def _split(devices: str) -> list[str]:
    return [d.strip() for d in devices.split(",") if d.strip()]


def candidate_devices(env: Mapping[str, str] | None = None) -> list[str]:
    """Devices a workstation job may claim: ``MUTDET_GPUS``, else ``nvidia-smi -L``, else (only when
    GPU device files exist, importing torch takes seconds) ``torch.cuda.device_count()``."""
    env = os.environ if env is None else env
    if env.get("MUTDET_GPUS") is not None:
        return _split(env["MUTDET_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True).stdout
        return [str(i) for i, _ in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
    except (OSError, subprocess.SubprocessError):
        pass
    if not (Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists()):
        return []
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: no devices
        return []


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} host {os.uname().nodename} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    return fd


def claim_devices(count: int, devices: Sequence[str], lock_dir: str | Path, *, poll: float = 5.0,
                  timeout: float | None = None) -> dict[str, int]:
    """Lock ``count`` of ``devices`` (all at once, so two jobs never deadlock holding half each);
    wait while fewer are free. Returns ``{device: locked fd}``; :func:`release_devices` or process
    exit frees them. ``timeout`` (seconds, None: wait forever) raises TimeoutError."""
    devices = list(dict.fromkeys(devices))
    if count > len(devices):
        raise ValueError(f"{count} GPU(s) requested but only {len(devices)} device(s) to choose from: {devices} "
                         "(set MUTDET_GPUS=0,1,... or lower the job's gpu resource)")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    start, waiting_logged = time.monotonic(), 0.0
    while True:
        held: dict[str, int] = {}
        for device in devices:
            fd = _try_lock(lock_dir / f"gpu-{device}.lock")
            if fd is not None:
                held[device] = fd
                if len(held) == count:
                    return held
        release_devices(held)
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"no {count} free GPU(s) of {devices} after {waited:.0f} s (locks in {lock_dir})")
        if not waiting_logged or waited - waiting_logged >= 600:
            log.info("waiting for %d free GPU(s) of %s (%d free now; locks in %s)", count, devices, len(held), lock_dir)
            waiting_logged = max(waited, 1e-9)
        time.sleep(poll)


def release_devices(held: Mapping[str, int]) -> None:
    for fd in held.values():
        try:
            os.close(fd)
        except OSError:
            pass


def _is_python(arg: str) -> bool:
    return os.path.basename(arg).startswith("python")


def build_command(command: Sequence[str], *, nproc: int, torchrun: bool) -> list[str]:
    """The command to run: under ``torch.distributed.run`` for ``nproc`` > 1 with ``torchrun``."""
    command = list(command)
    if not command:
        raise ValueError("no command given (expected: ... -- python -m mutdet <stage> ...)")
    if not torchrun or nproc <= 1:
        return command
    head = [f"--nproc_per_node={nproc}"]
    if os.path.basename(command[0]) == "torchrun":
        return [command[0], "--standalone", *head, *command[1:]]
    if not _is_python(command[0]) or len(command) < 2:
        raise ValueError(f"--torchrun needs a 'python -m module ...' or 'python script.py ...' command, got {command}")
    rest = command[1:]
    if rest[0] == "-m":
        if len(rest) < 2:
            raise ValueError(f"'python -m' without a module: {command}")
    elif rest[0].startswith("-"):
        raise ValueError(f"--torchrun: python options before the module/script are not supported: {command}")
    return [command[0], "-m", "torch.distributed.run", "--standalone", *head, *rest]


def _child_setup() -> None:  # runs in the child between fork and exec
    try:  # SIGTERM when the launcher dies (Linux), so a killed launcher never leaves the job running
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: best effort
        pass


def launch(command: Sequence[str], *, gpus: int, lock_dir: str | Path | None = None, torchrun: bool = False,
           nproc: int | None = None, env: Mapping[str, str] | None = None, poll: float = 5.0,
           wait_timeout: float | None = None) -> int:
    """Run ``command`` on ``gpus`` GPUs (see the module docstring); returns its exit status."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    env = dict(os.environ if env is None else env)
    held: dict[str, int] = {}
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        preset = preset_devices(env)
        if preset is not None:
            env["CUDA_VISIBLE_DEVICES"] = preset
            if len(_split(preset)) != gpus:
                log.warning("CUDA_VISIBLE_DEVICES=%r from the environment has %d device(s), %d requested: kept",
                            preset, len(_split(preset)), gpus)
        else:
            devices = candidate_devices(env)
            if devices:
                lock_dir = default_lock_dir(env) if lock_dir is None else Path(lock_dir)
                held = claim_devices(gpus, devices, lock_dir, poll=poll, timeout=wait_timeout)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(held)
            else:
                log.warning("%d GPU(s) requested but this machine has none: running on the CPU", gpus)
                env["CUDA_VISIBLE_DEVICES"] = ""
                gpus = 0
    nproc = nproc if nproc is not None else gpus
    argv = build_command(command, nproc=nproc, torchrun=torchrun)
    log.info("CUDA_VISIBLE_DEVICES=%r: %s", env["CUDA_VISIBLE_DEVICES"], " ".join(argv))

    previous = {}
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum, _frame):
        if child is None:
            pending.append(signum)
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    try:
        # Own process group: a signal reaches the child (and torchrun's workers) once, through us.
        # pass_fds: the child holds the GPU locks too, for as long as it runs.
        child = subprocess.Popen(argv, env=env, pass_fds=tuple(held.values()), start_new_session=True,
                                 preexec_fn=_child_setup)
        for sig in pending:
            forward(sig, None)
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() already
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        release_devices(held)
    return 128 - rc if rc < 0 else rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mutdet.engine.launch", description=__doc__.splitlines()[0],
                                usage="%(prog)s [--gpus N] [--torchrun] [--nproc N] [--lock-dir DIR] -- COMMAND ...")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the job (0: CPU only; default 0)")
    p.add_argument("--torchrun", action="store_true", help="one process per GPU with torchrun when more than one")
    p.add_argument("--nproc", type=int, help="processes under torchrun (default: --gpus; e.g. 2 with --gpus 0 for gloo)")
    p.add_argument("--lock-dir", type=Path, help="GPU lock files (default $MUTDET_GPU_LOCK_DIR or /tmp/mutdet-gpu-locks-<uid>)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between tries while no GPU is free")
    p.add_argument("--wait-timeout", type=float, help="give up (exit 75) after waiting this long for GPUs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        build_parser().error("separate the command with --, e.g. --gpus 1 -- python -m mutdet finetune ...")
    split = argv.index("--")
    args = build_parser().parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        build_parser().error("no command after --")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s launch: %(message)s", stream=sys.stderr)
    try:
        return launch(command, gpus=args.gpus, lock_dir=args.lock_dir, torchrun=args.torchrun, nproc=args.nproc,
                      poll=args.poll, wait_timeout=args.wait_timeout)
    except TimeoutError as e:
        log.error("%s", e)
        return 75  # EX_TEMPFAIL
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
