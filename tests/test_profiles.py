"""The SLURM and workstation profiles load and give the GPU rules their resources (dry runs; the real
scheduler run is .ci/slurm-test.sh)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
GPU_RULES = ("propose", "embed", "pretrain", "finetune")


def _dry_run(profile: str, tmp_path) -> dict[str, str]:
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-n", "--profile", str(REPO / profile),
                           "--configfile", str(REPO / ".test" / "config.yaml"), "-d", str(tmp_path)],
                          cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resources = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout):
        m = re.match(r"(?:local)?rule (\w+):", block)
        r = re.search(r"resources: (.*)", block)
        if m and r:
            resources.setdefault(m.group(1), r.group(1))
    return resources


def test_slurm_profile(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert cfg["executor"] == "slurm" and cfg["retries"] >= 1 and cfg["latency-wait"] >= 10
    assert "EDIT_ME" in cfg["default-resources"]["slurm_partition"]
    for rule in GPU_RULES:
        assert cfg["set-resources"][rule]["gpu"] >= 1 and "gres" not in cfg["set-resources"][rule]
    resources = _dry_run("workflow/profiles/slurm", tmp_path)
    assert "gpu=1" in resources["finetune"] and "mem_mb=32000" in resources["finetune"]
    assert "cpus_per_task=8" in resources["finetune"] and "runtime=1440" in resources["finetune"]
    assert "gpu" not in resources["tile"] and "cpus_per_task=4" in resources["tile"]


def test_local_profile(tmp_path):
    cfg = yaml.safe_load((REPO / "workflow/profiles/local/config.yaml").read_text())
    assert any(r.startswith("gpu=") for r in cfg["resources"])
    assert all(cfg["set-resources"][rule]["gpu"] == 1 for rule in GPU_RULES)
    resources = _dry_run("workflow/profiles/local", tmp_path)
    assert "gpu=1" in resources["finetune"] and "gpu" not in resources["tile"]
