"""Snakemake-level reliability: a run killed with SIGKILL at a random moment and then rerun ends with the
same results as an uninterrupted run; a config change reruns training from scratch instead of resuming
weights made by the old settings. Everything goes through the `snakemake` command line; the checks only
read the artefacts (Parquet, JSON, torch checkpoints, job logs)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TEST_CONFIG = REPO / ".test" / "config.yaml"
# The kill lands at a fixed fraction of the uninterrupted run's duration (KILL_WINDOW: past tiling,
# proposals and clustering, before the tables). Seed 12 draws 0.64: on a shared 2-core machine that is
# in the training part of the run (seen: the first fine-tunes' evaluate jobs, the second pre-training).
KILL_SEED = 12
KILL_WINDOW = (0.45, 0.85)

pytestmark = [pytest.mark.reliability, pytest.mark.workflow]


def snakemake_env():
    # The jobs import mutdet from this checkout, like the tests do.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": path}


def snakemake(*args, cwd=REPO, check=True):
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args], cwd=cwd, env=snakemake_env(),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_args(workdir, configfile=TEST_CONFIG):
    return ["--cores", "2", "-d", str(workdir), "--configfile", str(configfile)]


def job_counts(plan: str) -> dict[str, int]:
    """Rule -> number of jobs from a `snakemake -n` output ({} when there is nothing to do)."""
    if "Job stats:" not in plan:
        assert "Nothing to be done" in plan, plan
        return {}
    lines = plan.split("Job stats:")[1].splitlines()[3:]
    return {line.split()[0]: int(line.split()[1]) for line in lines
            if len(line.split()) == 2 and line.split()[1].isdigit() and line.split()[0] != "total"}


# -- comparing two run folders -------------------------------------------------------------------------
EXCLUDED_DIRS = {".snakemake", "logs", "parts", "checkpoints"}  # see test_kill_9_then_rerun_equals_uninterrupted_run
WALL_CLOCK_KEYS = re.compile(r"^(seconds|time|.*_per_second)$")
RESUME_ACCOUNTING_KEYS = re.compile(r"^.*_(reused|computed)$")


def artefacts(workdir: Path) -> set[Path]:
    return {p.relative_to(workdir) for p in workdir.rglob("*")
            if p.is_file() and not EXCLUDED_DIRS & set(p.relative_to(workdir).parts)}


def without_volatile(value):
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items()
                if not WALL_CLOCK_KEYS.match(k) and not RESUME_ACCOUNTING_KEYS.match(k)}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def load_checkpoint(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)  # as mutdet/engine/checkpoint.py reads them


def same_values(a, b, where=""):
    """'' if equal (tensors with torch.equal, containers recursively), else where they first differ."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return "" if ok else where or "tensor"
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{where}: keys {sorted(set(a) ^ set(b))}"
        return next((d for k in a if (d := same_values(a[k], b[k], f"{where}.{k}"))), "")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := same_values(x, y, f"{where}[{i}]"))), "")
    return "" if a == b else f"{where}: {a!r} != {b!r}"


def difference(a: Path, b: Path) -> str:
    """'' if two artefacts hold the same results, else what differs."""
    import pyarrow.parquet as pq

    if a.suffix == ".parquet":
        # Full schema metadata included: the final artefacts' metadata holds parameters, code version and
        # workdir-relative input paths only (no timestamps; the mtime-keyed parts/ are excluded).
        ta, tb = pq.read_table(a), pq.read_table(b)
        return "" if ta.equals(tb, check_metadata=True) else "Parquet tables differ"
    if a.suffix == ".pt":
        ca, cb = load_checkpoint(a), load_checkpoint(b)
        return same_values(ca, cb, "checkpoint")
    if a.suffix == ".json":
        ja, jb = (without_volatile(json.loads(p.read_text())) for p in (a, b))
        return same_values(ja, jb, "json")
    if a.suffix == ".jsonl":
        ja, jb = ([without_volatile(json.loads(line)) for line in p.read_text().splitlines() if line.strip()]
                  for p in (a, b))
        return same_values(ja, jb, "jsonl")
    return "" if a.read_bytes() == b.read_bytes() else "bytes differ"


def compare_runs(run_a: Path, run_b: Path) -> list[Path]:
    """Assert that two run folders hold the same artefacts with the same results; returns those compared."""
    files_a, files_b = artefacts(run_a), artefacts(run_b)
    assert files_a == files_b, (f"only in {run_a.name}: {sorted(map(str, files_a - files_b))}; "
                                f"only in {run_b.name}: {sorted(map(str, files_b - files_a))}")
    differ = {str(rel): d for rel in sorted(files_a) if (d := difference(run_a / rel, run_b / rel))}
    assert not differ, f"{len(differ)} artefact(s) differ: {json.dumps(differ, indent=1)}"
    return sorted(files_a)


# -- processes and Snakemake's log of a killed run -----------------------------------------------------
def processes_in(folder: Path) -> dict[int, str]:
    """Processes (pid -> command line) whose working directory is ``folder`` (Snakemake runs every job in
    its `-d` folder): what is still running of a pipeline there."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if Path(os.readlink(f"/proc/{entry}/cwd")) == folder:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
        except OSError:  # gone meanwhile, a zombie, or not ours
            continue
    return found


def jobs_in_flight(workdir: Path) -> list[str]:
    """Jobs that Snakemake's log of the (first, killed) run in ``workdir`` started and never finished."""
    log = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))[0].read_text()
    started, finished = {}, set(re.findall(r"Finished jobid: (\d+)", log))
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", log):
        head = re.match(r"(?:local)?rule (\w+):", block)
        jobid = re.search(r"^\s+jobid: (\d+)", block, re.M)
        if head and jobid:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
            started[jobid.group(1)] = head.group(1) + (f" ({wildcards.group(1)})" if wildcards else "")
    return [name for jobid, name in started.items() if jobid not in finished]


def job_logs(workdir: Path, results: str, rule: str) -> dict[str, str]:
    return {str(p.relative_to(workdir)): p.read_text() for p in sorted((workdir / results / "logs" / rule).rglob("*.log"))}


def kill_run_after(workdir: Path, delay: float) -> float | None:
    """Start the tiny run in ``workdir`` in its own session and SIGKILL its whole process group after
    ``delay`` seconds; None if killed, else how long the run took (it finished first)."""
    start = time.monotonic()
    with open(workdir.parent / f"{workdir.name}.killed.out", "w") as out:
        proc = subprocess.Popen([SNAKEMAKE, "-s", str(REPO / "Snakefile"), *run_args(workdir)], cwd=REPO,
                                env=snakemake_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is Snakemake's pid
            proc.wait()
            return None
    assert rc == 0, (workdir.parent / f"{workdir.name}.killed.out").read_text()
    return time.monotonic() - start


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted tiny run (RUN_A) and how long it took; the tests only read it."""
    workdir = tmp_path_factory.mktemp("run_a")
    start = time.monotonic()
    snakemake(*run_args(workdir))
    return workdir, time.monotonic() - start


def test_kill_9_then_rerun_equals_uninterrupted_run(baseline, tmp_path):
    """SIGKILL to Snakemake's whole process group at a seeded random moment (a fraction of the
    uninterrupted run's duration), then `--unlock` (the kill leaves Snakemake's lock behind) and
    `--rerun-incomplete` as the README says: every artefact equals the uninterrupted run's. No process
    of the killed run may survive it (a job's own session included), and the rerun sets nothing aside.

    Compared: every file of both run folders (the file sets must be equal) except the excluded ones
    below. Parquet as tables including schema metadata; checkpoints (`checkpoint.pt`) entry by entry,
    every model tensor with torch.equal; JSON / JSON-lines (`metrics.json`, `metrics.jsonl`, manifests,
    summaries, `config.json`, `init.json`) as values; all else (tables CSV/MD/TeX, PNGs, tiles, fraction
    lists, the pca_kmeans.npz, the resolved config, the synthetic data) byte for byte.

    Excluded, because two *uninterrupted* runs already differ there or they record the run's history:
    - `.snakemake/`: Snakemake's own metadata, logs, locks and incomplete markers (timestamps, paths).
    - `<results>/logs/`: job logs (timestamps; RUN_B's tell of the kill and the resume).
    - `parts/` folders: per-image / per-chunk resume state of the tile, propose and embed jobs, not
      results; the tile parts' `mutdet_inputs` metadata is the input files' size and mtime_ns (their
      identity for resuming), which differs between any two runs. The shards' final Parquet files,
      built from the parts, are compared.
    - `checkpoints/` folders: training resume state (`last.pt`) and `stale/`, not results.
    - JSON keys `seconds`, `time`, `*_per_second`: wall-clock durations, timestamps, speeds.
    - JSON keys `*_reused`, `*_computed` (manifests, summaries): how much of a shard a job took over from
      an interrupted attempt, which is exactly what a resumed run records differently.
    Final checkpoints are compared whole, their RNG states included: the stages seed Python's, NumPy's
    and torch's generators (mutdet.engine.checkpoint.seed_all).
    """
    run_a, seconds = baseline
    fraction = random.Random(KILL_SEED).uniform(*KILL_WINDOW)
    reference = seconds
    for attempt in range(2):
        run_b = (tmp_path / f"run_b{attempt}").resolve()
        run_b.mkdir()
        delay = fraction * reference
        print(f"reference run: {reference:.1f} s; kill after {delay:.1f} s ({fraction:.2f} of it)")
        finished_in = kill_run_after(run_b, delay)
        if finished_in is None:
            break
        # The run finished before the kill: the machine is faster now (less load from other work) than
        # while the baseline ran. This run's duration is the reference of a second try in a fresh folder.
        reference = finished_in
    else:
        pytest.fail("the pipeline finished before the kill twice: the kill window is too late for this machine")
    # Jobs whose command runs in its own session (the GPU launcher's child) are not in the group: the
    # launcher's PR_SET_PDEATHSIG must end them. Nothing of the killed run may go on writing into RUN_B.
    deadline = time.monotonic() + 60
    while (left := processes_in(run_b)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # pragma: no cover - only on failure: do not leave them running
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed run still running: {left}"
    in_flight = jobs_in_flight(run_b)
    print(f"jobs in flight at the kill: {in_flight}")

    reruns = []
    for _ in range(3):
        proc = snakemake(*run_args(run_b), "--rerun-incomplete", check=False)
        reruns.append(proc.stdout + proc.stderr)
        if proc.returncode == 0:
            break
        assert "LockException" in reruns[-1], f"rerun failed:\n{reruns[-1]}"
        snakemake("--unlock", *run_args(run_b))
    else:
        pytest.fail(f"no rerun finished:\n{reruns[-1]}")
    assert "Nothing to be done" not in reruns[-1], "the kill left nothing to redo: it landed after the last job"
    assert "Nothing to be done" in snakemake("-n", *run_args(run_b)).stdout

    raw = yaml.safe_load(TEST_CONFIG.read_text())
    logs = {**job_logs(run_b, raw["results"], "finetune"), **job_logs(run_b, raw["results"], "pretrain")}
    print("resumed:", {k: re.findall(r"resumed from .*", v) for k, v in logs.items() if "resumed from" in v})
    # Same settings, inputs and code: nothing may be set aside as stale after a kill (writes are atomic).
    assert not {k for k, v in logs.items() if "not resuming" in v}, logs

    compared = compare_runs(run_a, run_b)
    names = {p.name for p in compared}
    assert {"checkpoint.pt", "metrics.json", "detections.parquet", "tiles.parquet", "targets.parquet",
            "index.md"} <= names, names
    assert sum(p.name == "checkpoint.pt" for p in compared) == 5 and any(p.suffix == ".csv" for p in compared)


def test_config_change_retrains_instead_of_resuming_stale_weights(baseline, tmp_path):
    """A changed training setting reruns exactly the training jobs it reaches (Snakemake's params
    trigger) and they train from scratch: their resume state is set aside (`checkpoints/stale/`, the
    job log says so) and the new weights differ. A change to an unrelated section reruns no training."""
    run_a, _ = baseline
    run_c = tmp_path / "run_c"
    shutil.copytree(run_a, run_c, symlinks=True)  # copy2 keeps mtimes: Snakemake sees the same state
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    results = raw["results"]
    assert job_counts(snakemake("-n", *run_args(run_c)).stdout) == {}

    def variant(name, edit):
        changed = json.loads(json.dumps(raw))
        edit(changed)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(changed))
        return path, job_counts(snakemake("-n", *run_args(run_c, path)).stdout)

    training = {"pretrain", "finetune"}
    upstream = {"demo_data_tiny", "tile", "propose", "embed", "cluster", "subset"}
    _, counts = variant("tables", lambda c: c.setdefault("tables", {}).update(num_tiles=2))
    assert counts.get("tables") == 1 and not (training | upstream | {"evaluate"}) & set(counts), counts

    finetune_lr = lambda c: c["finetune"]["train"].update(lr=3e-4)  # noqa: E731
    pretrain_lr = lambda c: c["pretrain"]["train"].update(lr=3e-4)  # noqa: E731
    _, counts = variant("finetune_lr", finetune_lr)
    assert counts.get("finetune") == counts.get("evaluate") == 3 and counts.get("tables") == 1, counts
    assert not ({"pretrain", "loss_curves"} | upstream) & set(counts), counts
    _, counts = variant("pretrain_lr", pretrain_lr)
    # both variants, and the fine-tunes initialised from them (their init checkpoint changes), not init~none
    assert counts.get("pretrain") == 2 and counts.get("finetune") == 2 and counts.get("loss_curves") == 1, counts
    assert not upstream & set(counts), counts
    plan = snakemake("-n", *run_args(run_c, tmp_path / "pretrain_lr.yaml")).stdout
    assert "init=none" not in plan and "init=detreg" in plan and "init=mutdet" in plan

    both, counts = variant("both", lambda c: (finetune_lr(c), pretrain_lr(c)))
    assert counts.get("pretrain") == 2 and counts.get("finetune") == 3, counts
    snakemake(*run_args(run_c, both))
    assert "Nothing to be done" in snakemake("-n", *run_args(run_c, both)).stdout

    new_checkpoints = sorted(p.relative_to(run_c) for p in (run_c / results).rglob("checkpoint.pt"))
    assert len(new_checkpoints) == 5, new_checkpoints
    for rel in new_checkpoints:
        old, new = load_checkpoint(run_a / rel)["model"], load_checkpoint(run_c / rel)["model"]
        assert old.keys() == new.keys()
        assert any(same_values(old[k], new[k]) != "" for k in old), f"{rel}: the weights did not change"
        # the old resume state is kept aside, not resumed and not lost
        stale = sorted((run_c / rel).parent.glob("checkpoints/stale/*.pt"))
        assert len(stale) == 1, f"{rel}: {stale}"
        assert same_values(load_checkpoint(stale[0])["model"], old, "stale") == ""
    logs = {**job_logs(run_c, results, "finetune"), **job_logs(run_c, results, "pretrain")}
    logs = {k: v for k, v in logs.items() if not k.endswith("loss_curves.log")}
    assert len(logs) == 5, list(logs)
    for name, text in logs.items():
        said = [line for line in text.splitlines() if "not resuming from" in line]
        assert len(said) == 1 and "stale" in said[0] and "step 0" in said[0], f"{name}:\n{text}"
        assert "resumed from" not in text, f"{name}:\n{text}"
